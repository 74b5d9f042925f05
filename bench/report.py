"""BENCHMARKS.md from the JSON results of the bench scripts."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

HEADER = """# Benchmarks

Measured on this project's reference machine (2 CPU cores, no GPU) by the scripts in `bench/`; raw numbers in
`bench/results/*.json`. Regenerate with `make bench`.

## Compression vs accuracy (ResNet-20, Fashion-MNIST)

Every row wrote its `.zbit` file: *file bytes* is its size on disk, *accuracy* the test-set accuracy (10,000
images) of the model decoded from it, Δ against the fp32 model in the same run. Same fine-tune budget for every
strategy (epochs column); searches score on the validation split held out of training.

"""


def _budget_key(budget: str) -> tuple[str, float]:
    kind, _, value = budget.rpartition("=")
    try:
        return kind, -float(Fraction(value))
    except ValueError:
        return kind, 0.0


def compression_table(rows: list[dict]) -> str:
    lines = ["| budget | strategy | file bytes | ratio | test acc % | Δ vs fp32 | BOPs | MACs | epochs | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], _budget_key(r["budget"]), r["strategy"])):
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['strategy']} | refused: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {r['budget']} | {r['strategy']} | {r['file_bytes']:,} | {r['fp32_bytes'] / r['file_bytes']:.1f}× | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - r['baseline_accuracy']):+.2f} | "
            f"{r['bops'] / 1e6:,.1f} M | {r['macs'] / 1e6:,.2f} M | {r['epochs']:g} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_benchmarks_md(rows: list[dict], path: Path) -> None:
    base = rows[0] if rows else {}
    ref = (f"fp32 model: {base.get('fp32_bytes', 0):,} bytes, {100 * base.get('baseline_accuracy', 0):.2f}% test "
           f"accuracy, {base.get('fp32_macs', 0) / 1e6:.2f} M MACs.\n\n" if base and "error" not in base else "")
    path.write_text(HEADER + ref + compression_table(rows))
