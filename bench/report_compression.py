"""BENCHMARKS.md's compression tables: one per (model, device, fine-tune epochs), the best per budget above each."""

from __future__ import annotations

from fractions import Fraction

COMPRESSION_ABOUT = """## Compression vs accuracy (ResNet-20, Fashion-MNIST)

Every row wrote its file for real: *file bytes* is its size on disk, *accuracy* the test-set accuracy (10,000
images) of the model decoded from it, Δ against the fp32 model in the same run. Within a table every strategy gets
the same fine-tune budget (including what a strategy spends inside its search: sequential and ADMM train half of it
before their final policy); searches score on the validation split held out of training. *search s* is the time
to choose the policy, *total s* the whole run. The *peer* rows are what established tools give under the same
budget and epochs: Torch-Pruning uniform L2 channel pruning, the same float fine-tune (zerobit's loop, the same
distillation), then onnxruntime static QDQ (uint8 activations, int8 or int4 per-channel weights), sized by the
`.onnx` file after a lossless clean-up and evaluated in onnxruntime; its best weight format per budget is shown.
`python bench/compression.py --strategies uniform,admm,sequential,opq,peer --budgets 1/16,1/32,1/64,1/128 --epochs 3`.
Seconds depend on what else ran: the 3-epoch CPU rows ran two processes at a time on the 2 cores, one thread
each.
"""


def budget_key(budget: str) -> tuple[str, float]:
    """Sort key of a budget: by kind, then the largest first ("1/16" before "1/128")."""
    kind, _, value = budget.rpartition("=")
    try:
        return kind, -float(Fraction(value))
    except ValueError:
        return kind, 0.0


def _protocol(row: dict) -> tuple[str, str, float]:
    return row.get("model", "resnet20"), row.get("device", "cpu"), float(row.get("epochs") or 0)


def compression_sections(rows: list[dict]) -> str:
    """One table per (model, device, epochs): ResNet-20 first, the longest fine-tunes first; a short summary of
    the best per budget."""
    text = COMPRESSION_ABOUT
    for model, device, epochs in sorted({_protocol(r) for r in rows},
                                        key=lambda p: (p[0] != "resnet20", p[0], -p[2], p[1])):
        group = [r for r in rows if _protocol(r) == (model, device, epochs)]
        names = sorted({r["device_name"] for r in group if r.get("device_name")})
        where = f"{device} ({'; '.join(names)})" if names else f"{device} (2 CPU cores, the reference machine)"
        seeds = sorted({r.get("seed", 0) for r in group})
        ok = [r for r in group if "error" not in r]
        history = (" — history: every row got this short budget because 2 CPU cores fit nothing more (ajpq rows: "
                   "1,000 validation images per episode, bfloat16 autocast, re-rank of the 5 leaders; *500 images*: "
                   "`--option proxy.samples=500`, float32)") if epochs < 1 else ""
        title = "" if model == "resnet20" else f"{model}: "
        text += f"\n### {title}{epochs:g} fine-tune epochs on {where}, seed {', '.join(map(str, seeds))}{history}\n\n"
        if ok:
            r0 = ok[0]
            text += (f"fp32 model: {r0['fp32_bytes']:,} bytes, {100 * r0['baseline_accuracy']:.2f}% test accuracy"
                     + (f", {r0['fp32_macs'] / 1e6:.2f} M MACs" if "fp32_macs" in r0 else "") + ".\n\n")
        text += _best_lines(group) + compression_table(group)
    return text


def _best_lines(rows: list[dict]) -> str:
    lines = []
    for budget in sorted({r["budget"] for r in rows}, key=budget_key):
        ok = [r for r in rows if r["budget"] == budget and "error" not in r]
        ours = [r for r in ok if not r["strategy"].startswith("peer")]
        peer = [r for r in ok if r["strategy"].startswith("peer")]
        refused_peer = [r for r in rows if r["budget"] == budget and r["strategy"].startswith("peer") and "error" in r]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["accuracy"])
        line = f"- {budget}: best zerobit {100 * best['accuracy']:.2f}% ({best['strategy']})"
        if peer:
            line += f", peer {100 * max(r['accuracy'] for r in peer):.2f}%"
        elif refused_peer:
            line += ", peer cannot reach it"
        lines.append(line)
    return ("\n".join(lines) + "\n\n") if lines else ""


def compression_table(rows: list[dict]) -> str:
    lines = ["| budget | strategy | file bytes | ratio | test acc % | Δ vs fp32 | BOPs | MACs | epochs | search s | "
             "total s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    several_seeds = len({r.get("seed", 0) for r in rows}) > 1
    for r in sorted(rows, key=lambda r: (r["model"], budget_key(r["budget"]), r["strategy"], r.get("seed", 0))):
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['strategy']} | refused: {r['error'][:90]} | | | | | | | | |")
            continue
        episodes = r.get("info", {}).get("episodes")
        name = f"{r['strategy']} ({episodes} episodes)" if episodes else r["strategy"]
        if r.get("task") == "distillation":  # trained and searched without labels; accuracy still on test labels
            name += f", label-free (cosine {r['task_metric']:.4f})"
        if several_seeds:
            name += f", seed {r.get('seed', 0)}"
        bops = f"{r['bops'] / 1e6:,.1f} M" if "bops" in r else ""
        mac = f"{r['macs'] / 1e6:,.2f} M" if "macs" in r else ""
        lines.append(
            f"| {r['budget']} | {name} | {r['file_bytes']:,} | {r['fp32_bytes'] / r['file_bytes']:.1f}× | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - r['baseline_accuracy']):+.2f} | "
            f"{bops} | {mac} | {r['epochs']:g} | "
            f"{r.get('seconds_by_stage', {}).get('search', 0):.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def spread_section(record: dict) -> str:
    """Run-to-run spread of one strategy (bench/spread.py): every run, then per budget the spread and the largest
    gaps between runs that differ in one thing only."""
    rows = sorted(record["rows"], key=lambda r: (budget_key(r["budget"]), r["threads"], r["seed"], r["repeat"]))
    devices = sorted({r["device"] for r in rows})
    same = ("the seed also seeds the search (other policies, other bytes)" if record.get("seed_search")
            else "the same policy at each budget (same file bytes)")
    text = (f"\n## Run-to-run spread ({record['strategy']}, {record['model']}, `bench/spread.py`)\n\n"
            f"{record['strategy']} with {record['epochs']:g} fine-tune epochs, compressed again under other seeds, "
            f"other torch thread counts, or the same settings again (repeat), on {'; '.join(devices)}; {same}. A "
            "gap between two strategies at a budget smaller than the spread here says nothing about the strategies. "
            "`python bench/spread.py`\n\n"
            "| budget | seed | torch threads | repeat | file bytes | test acc % | run s |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        text += (f"| {r['budget']} | {r['seed']} | {r['threads']} | {r['repeat']} | {r['file_bytes']:,} | "
                 f"{100 * r['accuracy']:.2f} | {r['seconds']:.0f} |\n")
    text += ("\n| budget | runs | mean acc % | st. dev. | range | largest gap: seeds | threads | repeats |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|\n")

    def points(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"
    for s in record.get("summary", []):
        text += (f"| {s['budget']} | {s['runs']} | {s['mean']:.2f} | {points(s['stdev'])} | "
                 f"{s['min']:.2f}–{s['max']:.2f} | {points(s['gap_seed'])} | {points(s['gap_threads'])} | "
                 f"{points(s['gap_repeat'])} |\n")
    return text
