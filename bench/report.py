"""BENCHMARKS.md from the JSON results of the bench scripts (bench/results/*.json)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

HEADER = """# Benchmarks

Measured on this project's reference machine (2 CPU cores, no GPU) by the scripts in `bench/`; raw numbers in
`bench/results/*.json`. Regenerate with `make bench`.

## Compression vs accuracy (ResNet-20, Fashion-MNIST)

Every row wrote its `.zbit` file: *file bytes* is its size on disk, *accuracy* the test-set accuracy (10,000
images) of the model decoded from it, Δ against the fp32 model in the same run. Same fine-tune budget for every
strategy (epochs column, including what a strategy spends inside its search: sequential and ADMM train half of it
before their final policy); searches score on the validation split held out of training. *search s* is the time
to choose the policy (for AJPQ: all its episodes and the final re-rank), *total s* the whole run. The `ajpq` rows
ran with the defaults (1,000 validation images per episode, bfloat16 autocast on this CPU, re-rank of the 5
leaders); the `ajpq, 500 images` rows with `--option proxy.samples=500`, in float32 (before the autocast).

"""


def _budget_key(budget: str) -> tuple[str, float]:
    kind, _, value = budget.rpartition("=")
    try:
        return kind, -float(Fraction(value))
    except ValueError:
        return kind, 0.0


def compression_table(rows: list[dict]) -> str:
    lines = ["| budget | strategy | file bytes | ratio | test acc % | Δ vs fp32 | BOPs | MACs | epochs | search s | "
             "total s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], _budget_key(r["budget"]), r["strategy"])):
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['strategy']} | refused: {r['error'][:90]} | | | | | | | | |")
            continue
        episodes = r.get("info", {}).get("episodes")
        name = f"{r['strategy']} ({episodes} episodes)" if episodes else r["strategy"]
        lines.append(
            f"| {r['budget']} | {name} | {r['file_bytes']:,} | {r['fp32_bytes'] / r['file_bytes']:.1f}× | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - r['baseline_accuracy']):+.2f} | "
            f"{r['bops'] / 1e6:,.1f} M | {r['macs'] / 1e6:,.2f} M | {r['epochs']:g} | "
            f"{r['seconds_by_stage'].get('search', 0):.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def proxy_section(summary: dict) -> str:
    lines = [f"\n## AJPQ reward proxy vs accuracy after fine-tuning, {summary['budget']}\n\n"
             f"{len(summary['policies'])} random policies "
             f"under a {summary['budget']} size budget (as AJPQ's warm-up draws them); each scored by the proxies, "
             f"then fine-tuned for real ({summary['epochs']:g} epoch, distillation) and tested. Spearman rank "
             "correlation of proxy score (accuracy, or −KL from the fp32 outputs, on 1,000 validation images) vs "
             "final test accuracy:\n", "| proxy | score | Spearman ρ | seconds / policy |", "|---|---|---:|---:|"]
    for name, secs in summary["proxy seconds"].items():
        for metric in ("accuracy", "kl"):
            lines.append(f"| {name} | {metric} | {summary['spearman'][f'{name} {metric}']:+.2f} | {secs:.2f} |")
    lines.append(f"| (no proxy) | bytes used | {summary['spearman']['bytes used']:+.2f} | 0 |")
    lines.append("\nMost of these policies sit near chance under BN-only proxies, so a few images more or less right "
                 "reorder them: ρ on 10 policies moves by about ±0.1 between re-scores.")
    for name, agree in summary.get("bfloat16 vs float32", {}).items():
        lines.append(f"\n*{name}* vs the same proxy in float32: accuracies differ by at most "
                     f"{agree['max abs difference']:.1f} points on any policy; ρ between the two {agree['spearman']:+.2f}.")
    return "\n".join(lines) + "\n"


def rerank_section(summary: dict) -> str:
    scores = list(summary["spearman"])
    lines = [f"\n## AJPQ: the search's leading policies, fine-tuned\n\nOne AJPQ search at {summary['budget']} "
             f"({summary['search seconds']:.0f} s, options {', '.join(summary['options']) or 'default'}); its "
             f"{len(summary['policies'])} best distinct policies by search reward, re-scored by larger proxies and "
             f"fine-tuned for real ({summary['epochs']:g} epoch, distillation). `bench/ajpq_rerank.py`.\n",
             "| rank | bytes | " + " | ".join(scores) + " | test acc % |", "|---:|---:|" + "---:|" * (len(scores) + 1)]
    for r in summary["policies"]:
        lines.append(f"| {r['rank']} | {r['bytes']:,.0f} | " + " | ".join(f"{r[s]:+.3f}" for s in scores) +
                     f" | {100 * r['final test accuracy']:.2f} |")
    lines.append("| Spearman ρ vs test acc | | " + " | ".join(f"{summary['spearman'][s]:+.2f}" for s in scores) + " | |")
    lines.append("| test acc % of its pick | | " + " | ".join(
        f"{100 * summary['accuracy of the pick'][s]:.2f}" for s in scores) + f" | best {100 * summary['best accuracy']:.2f} |")
    return "\n".join(lines) + "\n"


def runs_section(runs: dict) -> str:
    lines = [f"\n## AJPQ from run to run\n\n{runs['about']}\n", "| settings | file bytes | test acc % | search s |",
             "|---|---:|---:|---:|"]
    for r in runs["runs"]:
        lines.append(f"| {r['settings']} | {r['file_bytes']:,} | {100 * r['accuracy']:.2f} | {r['search_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def fuzz_section(summary: dict) -> str:
    lines = ["\n## Damaged .zbit files (`bench/fuzz_zbit.py`)\n\nEach trial damages a written file and loads it. "
             "Allowed: `ZbitFormatError`, or the very model written; a consistent *other* model only where the "
             "checksum was recomputed after the edit (a forgery the reader cannot tell from a real file). "
             f"Peak memory grew by {summary['peak rss growth MB during fuzzing']} MB over all trials; "
             f"seed {summary['seed']}, {summary['device']}.\n",
             "| file | damage | trials | ZbitFormatError | same model | another model | other exception |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in summary["runs"]:
        for kind, counts in run["outcomes"].items():
            other = sum(n for o, n in counts.items() if o not in ("ZbitFormatError", "same model", "another model"))
            lines.append(f"| {run['model']} ({run['file_bytes']:,} B) | {kind} | {sum(counts.values())} | "
                         f"{counts.get('ZbitFormatError', 0)} | {counts.get('same model', 0)} | "
                         f"{counts.get('another model', 0)} | {other} |")
        lines.append(f"| {run['model']} | slowest load | | {run['slowest']['seconds']} s | "
                     f"{run['slowest']['case']} | | |")
    return "\n".join(lines) + "\n"


def write_benchmarks_md(rows: list[dict] | None, path: Path) -> None:
    """Rewrite BENCHMARKS.md from `rows` (or the stored compression results) and the other stored results."""
    if rows is None:
        stored = RESULTS / "compression.json"
        rows = json.loads(stored.read_text()) if stored.exists() else []
    ok = [r for r in rows if "error" not in r]
    ref = (f"fp32 model: {ok[0]['fp32_bytes']:,} bytes, {100 * ok[0]['baseline_accuracy']:.2f}% test accuracy, "
           f"{ok[0]['fp32_macs'] / 1e6:.2f} M MACs.\n\n" if ok else "")
    text = HEADER + ref + compression_table(rows)
    for proxy in sorted(RESULTS.glob("ajpq_proxy*.json")):  # one rank study per budget
        text += proxy_section(json.loads(proxy.read_text()))
    runs = RESULTS / "ajpq_runs.json"
    if runs.exists():
        text += runs_section(json.loads(runs.read_text()))
    rerank = RESULTS / "ajpq_rerank.json"
    if rerank.exists():
        text += rerank_section(json.loads(rerank.read_text()))
    fuzz = RESULTS / "fuzz_zbit.json"
    if fuzz.exists():
        text += fuzz_section(json.loads(fuzz.read_text()))
    path.write_text(text)
