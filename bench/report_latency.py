"""BENCHMARKS.md's check of the latency table against whole-model timings (bench/deploy.py --stage table)."""

from __future__ import annotations


def table_check_lines(rows: list[dict], cpu: str) -> list[str]:
    """The latency table's check: calibrated predictions against whole-model timings, widths ×1 and ×8."""
    def stats(chosen: list[dict], key: str = "error") -> str:
        errors = [abs(r[key]) for r in chosen]
        return f"mean |error| {100 * sum(errors) / len(errors):.0f}%, largest {100 * max(errors):.0f}%"

    checked = [r for r in rows if not r.get("calibration")]
    aligned = [r for r in checked if r.get("multiple", 1) == 8]
    free = [r for r in checked if r.get("multiple", 1) == 1]
    single = [r for r in checked if "single_error" in r]
    head = (f"**Latency table vs whole-model timings** ({cpu}, onnxruntime 1 thread; uniform policies of each zoo "
            f"model, widths rounded to multiples of 8 (×8) and as they fall (×1), each exported and timed): "
            f"widths ×8: {stats(aligned)}; widths ×1: {stats(free)}; all: {stats(checked)}")
    if single:
        head += (f". Predicted as a `Latency` budget predicts: the table times a scale fitted to the model's "
                 f"`calibration_policies` (1, 3/4 and 0.3 of every group's channels, ×8, 8 bits: the geometric mean "
                 f"of measured / predicted; rows *calibration*, not counted, nor timed again at the same widths). "
                 f"*one-policy scale*: the earlier calibration, on the 3/4 policy alone — "
                 f"{stats(single, 'single_error')}. Every file of a model is timed interleaved with the others "
                 f"(median of 300 rounds at batch 1, 30 at 64)")
    out = [head + ".", "", "| model | batch | keep | bits | widths | measured ms | predicted ms | error | "
           "one-policy scale |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        error = "calibration" if r.get("calibration") else f"{100 * r['error']:+.0f}%"
        earlier = f"{100 * r['single_error']:+.0f}%" if "single_error" in r else ""
        out.append(f"| {r['model']} | {r['batch']} | {r['keep']:.2f} | {r['bits']} | ×{r.get('multiple', 1)} | "
                   f"{r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | {error} | {earlier} |")
    return out + [""]
