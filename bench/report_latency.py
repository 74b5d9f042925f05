"""BENCHMARKS.md's check of the latency table against whole-model timings (bench/deploy.py --stage table)."""

from __future__ import annotations


def table_check_lines(rows: list[dict], cpu: str) -> list[str]:
    """The latency table's check: calibrated predictions against whole-model timings, widths ×1 and ×8."""
    def stats(chosen: list[dict], key: str = "error") -> str:
        errors = [abs(r[key]) for r in chosen]
        return f"mean |error| {100 * sum(errors) / len(errors):.0f}%, largest {100 * max(errors):.0f}%"

    checked = [r for r in rows if not r.get("calibration")]
    aligned = [r for r in checked if r.get("multiple", 1) == 8]
    alone = [dict(r, alone=r["table_ms"] / r["measured_ms"] - 1) for r in checked if "table_ms" in r]
    head = (f"**Latency table vs whole-model timings** ({cpu}, onnxruntime 1 thread; uniform policies of each zoo "
            f"model, widths as they fall (×1) and rounded to multiples of 8 (×8), each exported and timed): "
            f"{stats(checked)}")
    if aligned:
        head += f"; widths ×8 alone: {stats(aligned)}"
    if alone:
        head += (f". Predicted as a `Latency` budget predicts: the table times the model's scale, measured once on "
                 f"its `calibration_policy` (3/4 of every group's channels, ×8, 8 bits; row *calibration*, not "
                 f"counted); the table alone errs by {stats(alone, 'alone')}. Every file of a model is timed "
                 f"interleaved with the others (median of 300 rounds at batch 1, 30 at batch 64)")
    out = [head + ".", "", "| model | batch | keep | bits | widths | measured ms | predicted ms | error | table alone |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = "calibration" if r.get("calibration") else f"{100 * r['error']:+.0f}%"
        alone_err = f"{100 * (r['table_ms'] / r['measured_ms'] - 1):+.0f}%" if "table_ms" in r else ""
        out.append(f"| {r['model']} | {r['batch']} | {r['keep']:.2f} | {r['bits']} | ×{r.get('multiple', 1)} | "
                   f"{r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | {error} | {alone_err} |")
    return out + [""]
