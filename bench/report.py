"""BENCHMARKS.md from the JSON results of the bench scripts (bench/results/*.json)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report_compression import budget_key, compression_sections, spread_section
from bench.report_latency import table_check_lines

RESULTS = Path(__file__).resolve().parent / "results"

HEADER = """# Benchmarks

Measured by the scripts in `bench/`; raw numbers in `bench/results/*.json`. Every row names its device, its
fine-tune epochs and its seed. Regenerate with `make bench` (CPU) or the commands in each section.

"""

def quantizer_section(rows: list[dict]) -> str:
    lines = ["\n## Quantizers: MSE-clipped max scaling vs learned step sizes (LSQ)\n\nThe same policy per budget "
             "(searched once), the same fine-tune (epochs, seed, distillation); only how the steps are set differs: "
             "*mse* = max|w|·clip per channel (clip chosen by squared error when the policy is applied), "
             "activation steps fixed at calibration; *lsq* = both start there and are learned with the weights. "
             "`python bench/quantizers.py --cases 1/32@2,1/16@3 --epochs 0.5` (BUDGET@BITS: the uniform policy at "
             "that budget with its kept channels at BITS bits).\n",
             "| budget | weight bits | strategy | quantizer | file bytes | test acc % | epochs | device | seed |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (budget_key(r["budget"]), r["epochs"], r["quantizer"])):
        lines.append(f"| {r['budget']} | {r['bits']} | {r['strategy']} | {r['quantizer']} | {r['file_bytes']:,} | "
                     f"{100 * r['accuracy']:.2f} | {r['epochs']:g} | {r.get('device_name', r['device'])} | "
                     f"{r['seed']} |")
    return "\n".join(lines) + "\n"


def throughput_section(results: list[dict]) -> str:
    lines = ["\n## QAT throughput (`bench/qat_throughput.py`)\n\nImages/s of the real fine-tune loop on ResNet-20 "
             "pruned by the uniform policy; the same pruned model trained in float is the reference. The variants "
             "take turns, the median of the rounds counts. *unfolded teacher* is the uncompressed model as given "
             "(what the loop used before the teacher was folded).\n"]
    for res in results:
        lines += [f"\n{res['device_name']} ({res['device']}), budget {res['budget']}, batch {res['batch_size']}, "
                  f"{res['steps']} steps × {res['rounds']} rounds:\n", "| step | images/s | × float step | "
                  "× float step with distillation |", "|---|---:|---:|---:|"]
        for name, rate in res["images_per_s"].items():
            lines.append(f"| {name} | {rate:,.0f} | {res['ratio vs float'][name]:.2f} | "
                         f"{res['ratio vs float + distillation'][name]:.2f} |")
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


def deploy_section(result: dict) -> str:
    """onnxruntime latency of fp32, zerobit's files and the peer's, per batch; the latency table's error; and the
    Latency-vs-MACs budget comparison."""
    lines = ["## Deployment: onnxruntime latency, ONNX bytes and parity (ResNet-20)", "",
             f"CPU: {result['cpu']}, onnxruntime on {result['threads']} thread(s); zerobit's models fine-tuned "
             f"{result['epochs']:g} epochs (seed {result['seed']}), exported by `export_onnx` in mode fast (*exact* rows: "
             "mode exact, the .zbit model's own numbers); *m8*: `channel_multiple=8`; the peer's "
             "files are Torch-Pruning + onnxruntime static QDQ at the same byte budget. *ms* is the median of "
             "interleaved calls (every repetition calls every file once, in turn); *×* is fp32's time over the "
             "row's; *parity* the share of the 10,000 test images on which onnxruntime and the .zbit model agree; "
             "*table* the latency table's prediction error (the table of that run: version 2, not calibrated; "
             "the check below is the current one). The peer's files have the structure of its fine-tuned "
             "ones (latency only; its accuracy is in the compression table). *int8* rows: the same model with its "
             "≤ 4-bit layers stored as int8 (larger file, integer kernels). `python bench/deploy.py --stage build "
             "--strategies uniform,sequential,opq,admm,sbs --budgets 1/32,1/64`, the same with `--strategies "
             "uniform:m8,uniform --budgets 1/16,1/32,1/64,1/128`, then `python bench/deploy.py --stage measure "
             "--budgets 1/16,1/32,1/64,1/128` and `--stage latency`.", ""]
    for batch in sorted({r["batch"] for r in result["rows"]}):
        lines += [f"**batch {batch}**", "",
                  "| file | ms | × fp32 | .onnx bytes | .zbit bytes | accuracy % | parity % | max Δ logit | table |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["batch"] == batch):
            acc = f"{100 * r['accuracy']:.2f}" if "accuracy" in r else ""
            par = f"{100 * r['onnx_agreement']:.2f}" if "onnx_agreement" in r else ""
            diff = f"{r['onnx_max_abs_diff']:.3f}" if "onnx_max_abs_diff" in r else ""
            err = f"{100 * r['table_error']:+.0f}%" if "table_error" in r else ""
            zbit = f"{r['zbit_bytes']:,}" if "zbit_bytes" in r else ""
            lines.append(f"| {r['name']} | {r['ms']:.3f} | {r['speedup']:.2f} | {r['onnx_bytes']:,} | {zbit} | {acc} "
                         f"| {par} | {diff} | {err} |")
        lines.append("")
    if result.get("table_check"):
        lines += table_check_lines(result["table_check"], result.get("table_cpu", result.get("cpu", "?")))
    if result.get("latency_budget"):
        first = result["latency_budget"][0]
        setting = (f"{first['epochs']:g} fine-tune epochs on the CPU, seed {first['seed']}" if "epochs" in first
                   else "the fine-tune above")
        lines += [f"**Latency budget vs MACs budget** (batch 64, uniform, {setting}): the MACs fraction was "
                  "bisected until the policy's measured latency matched the Latency run's; *widths*: the widths "
                  "both runs searched (×8: multiples of 8 channels, a Latency's default where they reach the budget; "
                  "×1: any width). A fraction is of fp32's latency measured in the same run.", "",
                  "| budget | widths | accuracy % | measured ms | predicted ms | MACs |", "|---|---|---|---|---|---|"]
        for r in result["latency_budget"]:
            pred = f"{r['predicted_ms']:.3f}" if "predicted_ms" in r else ""
            widths = f"×{r['channel_multiple']}" if "channel_multiple" in r else "×1"
            lines.append(f"| {r['budget']} | {widths} | {100 * r['accuracy']:.2f} | {r['measured_ms']:.3f} | {pred} | "
                         f"{r['macs']:,} |")
        unmatched = [r["budget"] for r in result["latency_budget"] if r.get("matched") is False]
        if unmatched:
            lines.append("")
            lines.append(f"{', '.join(unmatched)}: measured over 1.1× the Latency run above it: no fraction the "
                         "bisection tried (down to 1%) measured as fast, or one timing per fraction misled it.")
        if any("search_measured_ms" in r for r in result["latency_budget"]):
            lines.append("")
            lines.append("*measured ms*: each pair's two files timed again together, in turns (8 rounds, 4 s), after "
                         "both runs; the Latency run's own measurement, which its search met, is in the JSON "
                         "(`search_measured_ms`).")
        lines.append("")
    return "\n".join(lines) + "\n"


def sbs_layers_section(runs: dict) -> str:
    """Per-layer choices of SBS runs: one column per run, a cell = kept/total channels · weight bits · input bits."""
    if not runs:
        return ""
    keys = sorted(runs, key=lambda k: (runs[k]["model"], budget_key(runs[k]["budget"])))
    lines = ["## SBS: what it chose, layer by layer", "",
             "Each cell: output channels kept / total · weight bits (`w`) · input activation bits (`a`, f = float). "
             "Layers of one coupled group (a residual stream) share its channels and weight bits; input bits are "
             "per layer. From `python bench/sbs_layers.py runs/bench/sbs_*` after `bench/compression.py`.", ""]
    for model in sorted({runs[k]["model"] for k in keys}):
        cols = [k for k in keys if runs[k]["model"] == model]
        lines += [f"**{model}**", "", "| layer | " + " | ".join(
            f"{runs[k]['budget']}{', ' + runs[k]['label'] if runs[k].get('label') else ''}, {runs[k]['epochs']:g} ep, "
            f"{runs[k]['device']}: {100 * runs[k]['accuracy']:.2f}%"
            for k in cols) + " |", "|---|" + "---|" * len(cols)]
        names = [row["layer"] for row in runs[cols[0]]["layers"]]
        for i, name in enumerate(names):
            cells = []
            for k in cols:
                row = runs[k]["layers"][i]
                wb = "/".join("f" if b == 32 else str(b) for b in row["weight_bits"])
                ab = "f" if row["act_bits"] == 32 else row["act_bits"]
                cells.append(f"{row['kept']}/{row['channels']} · w{wb} · a{ab}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _run_times(r: dict) -> str:
    """The runs' own times in both halves: how much faster one run is with every core than with Ray's one CPU."""
    pairs = [(row["ray_run_seconds"], row["serial_run_seconds"]) for row in r["rows"] if row.get("serial_run_seconds")]
    if not pairs:
        return ""
    ray, serial = (sum(x) for x in zip(*pairs, strict=True))
    return (f" The runs' own times add up to {ray:.0f} s on Ray (one CPU each) and {serial:.0f} s in turn (every core):"
            f" given every core, a run is already {ray / serial:.2f}× as fast, which is what the two Ray slots compete "
            "with.")


def _drawn(r: dict) -> str:
    """Which runs a sweep record's report draws: the half that ran last, with the peer's files where measured."""
    half = "the Ray sweep" if r.get("report_from", "ray") == "ray" else "the sweep in turn"
    peers = f" with the peer's {r['peer_points']} files at the same epochs and seed" if r.get("peer_points") else ""
    return f"the report of {half}{peers}"


def sweep_section(r: dict) -> str:
    """A sweep on the local Ray cluster vs the same runs in turn (bench/sweep.py)."""
    opts = "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in r["options"].items())
    lines = [f"### {r['epochs']:g} fine-tune epochs", "",
             f"{r['runs']} runs ({', '.join(r['strategies'])} × {', '.join(r['budgets'])}) of {r['model']}, "
             f"{r['epochs']:g} fine-tune epochs, seed {r['seed']}, {r['device']}{'; ' + opts if opts else ''}. "
             "Ray: a local Ray instance, one CPU per run (two runs at once); in turn: `zerobit sweep` without "
             f"`--ray-address`, each run with every core. From `python bench/sweep.py`; {_drawn(r)} is "
             f"[{r['report']}]({r['report']}).", "",
             "| sweep | wall time (s) |", "|---|---|", f"| Ray, local cluster | {r['ray_seconds']:.0f} |"]
    if r.get("serial_seconds"):
        lines += [f"| in turn | {r['serial_seconds']:.0f} |", "",
                  f"Ray finishes the sweep {r['speedup']:.2f}× as fast as running the runs in turn.{_run_times(r)}"]
    else:
        lines += ["", "The same runs in turn are not timed yet (`python bench/sweep.py --only serial` with the same "
                      "settings completes this record)."]
    lines += ["", "| run | accuracy % (Ray) | accuracy % (in turn) | file bytes | ratio | run s (Ray) | run s (in turn) |",
              "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        serial = row.get("serial_accuracy")
        lines.append(f"| {row['name']} | {100 * row['accuracy']:.2f} | "
                     f"{'' if serial is None else f'{100 * serial:.2f}'} | {row['file_bytes']:,} | {row['ratio']:.1f}× | "
                     f"{row['ray_run_seconds']:.0f} | {_seconds(row.get('serial_run_seconds'))} |")
    for name, error in r.get("failed", {}).items():
        lines.append(f"| {name} | not run: {error} | | | | | |")
    return "\n".join(lines) + "\n\n"


def ajpq_workers_section(r: dict) -> str:
    """AJPQ episodes per second with K parallel scorers (bench/ajpq_workers.py)."""
    lines = ["## AJPQ with K parallel scorers", "",
             f"{r['model']}, budget {r['budget']}, {r['episodes']} episodes, seed {r['seed']}, {r['device']}. "
             f"K = 1: the serial search in one process with every core; K > 1: K Ray actors with one CPU each score "
             f"the K policies the agent proposes at once. {r['note']}.", "",
             "| K | episodes | seconds | episodes/s | best reward | mean reward, last quarter |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['workers']} | {row['episodes']} | {row['seconds']:.0f} | {row['episodes_per_s']:.3f} | "
                     f"{row['best_reward']:.2f} | {row['mean_last_quarter']:.2f} |")
    return "\n".join(lines) + "\n\n"


def architectures_section(rows: list[dict]) -> str:
    """Hugging Face architectures through compress → save → load (bench/architectures.py)."""
    version = rows[0].get("transformers", "?") if rows else "?"
    text = ("\n## Hugging Face architectures, end to end (`bench/architectures.py`)\n\n"
            f"Small configs of each architecture (transformers {version}, random weights: the real model code), "
            "compressed to 1/4 of the fp32 bytes with a 0.5-epoch fine-tune on random batches, saved, loaded into a "
            "fresh model and run again; CPU, 1 thread, seed 0. *Δ after load*: the largest difference of the "
            "loaded model's outputs from the compressed model's. *prunable*: coupled groups whose channels may be "
            "removed (the rest are quantized only), of all groups; *heads*: groups decided head by head. *ONNX*: "
            "the .zbit exported by `export_onnx(..., mode=\"exact\")` and run in onnxruntime on the validation "
            "batches: its bytes, the share of equal argmax (per token for a language model) and the largest logit "
            "difference from the loaded model.\n\n"
            "| architecture | strategy | result | file bytes | budget bytes | Δ after load | prunable | heads | ONNX bytes "
            "| ONNX agreement % | ONNX Δ | s |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        if not r["ok"]:
            text += f"| {r['architecture']} | {r['strategy']} | failed: {r['error']} | | | | | | | | | |\n"
            continue
        onnx = (f"{r['onnx_bytes']:,} | {100 * r['onnx_agreement']:.2f} | {r['onnx_max_abs_diff']:.1e}"
                if "onnx_bytes" in r else f"{r.get('onnx_error', 'not run')} | | ")
        text += (f"| {r['architecture']} | {r['strategy']} | ok | {r['file_bytes']:,} | {r['budget_limit']:,.0f} | "
                 f"{r['max_abs_diff_after_load']:.1e} | {r['prunable_groups']}/{r['groups']} | "
                 f"{r['head_groups']} | {onnx} | {r['seconds']:.1f} |\n")
    return text


def widths_section(r: dict) -> str:
    """One quantized conv timed by kept channel count (bench/widths.py)."""
    text = ("\n## Channel widths: one quantized 3×3 conv by kept channels (`bench/widths.py`)\n\n"
            f"CPU: {r['cpu']}, onnxruntime on {r['threads']} thread(s), batch {r['batch']}; a one-layer model as "
            "`export_onnx` writes it (uint8 input and output, int8 weights), equal input and output channels, timed "
            "as the latency table times layers (the model minus the same call without the layer, median). "
            "Why `channel_multiple=8` exists: some widths run in much faster kernels than the widths just below "
            "them. `python bench/widths.py`\n\n| input side | channels | ms | ms per channel |\n"
            "|---|---:|---:|---:|\n")
    for row in r["rows"]:
        text += (f"| {row['side']}×{row['side']} | {row['channels']} | {row['ms']:.3f} | "
                 f"{row['ms'] / row['channels']:.3f} |\n")
    return text


def depth_section(r: dict) -> str:
    """Residual branches removed whole against the same strategy keeping them (bench/depth.py)."""
    base = r["runs"][0]["baseline_accuracy"]
    text = (f"\n## Depth pruning: residual branches removed whole ({r['model']}, {r['budget']} of the bytes, "
            "`bench/depth.py`)\n\n"
            f"CPU: {r['cpu']}, onnxruntime on {r['threads']} thread(s); every model fine-tuned {r['epochs']:g} epochs "
            f"(seed {r['seed']}) on the CPU, `uniform` with `channel_multiple=8`; *removed*: `Uniform(empty=...)` "
            "(each branch's two convolutions leave the model, the file and the graph: the block adds a constant). "
            f"fp32: {100 * base:.2f}%. *fast*: `export_onnx` as it writes by default (int4 where every channel has "
            "≤ 4 bits); *int8*: the same codes stored as int8 (integer kernels throughout). *parity*: share of the "
            "10,000 test images on which onnxruntime and the .zbit model agree. Latency: median of interleaved "
            "calls (every repetition calls every file once); the peer is Torch-Pruning + onnxruntime static QDQ at "
            "the same byte budget" + ("" if any(t["name"].startswith("peer") for t in r["timings"]) else
                                      " (it has no file within this budget)")
            + (f"; {r['conditions']}" if r.get("conditions") else "")
            + f". `python bench/depth.py --budget {r['budget']} --epochs {r['epochs']:g}`\n\n"
            "| run | layers removed | test acc % | Δ vs fp32 | .zbit bytes | MACs | fast .onnx bytes | parity | "
            "int8 .onnx bytes | parity |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for run in r["runs"]:
        fast, int8 = run["files"]["fast"], run["files"]["int8"]
        text += (f"| {run['label']} | {len(run['removed'])} | {100 * run['accuracy']:.2f} | "
                 f"{100 * (run['accuracy'] - base):+.2f} | {run['zbit_bytes']:,} | {run['macs'] / 1e6:.2f} M | "
                 f"{fast['onnx_bytes']:,} | {100 * fast['agreement']:.2f} | {int8['onnx_bytes']:,} | "
                 f"{100 * int8['agreement']:.2f} |\n")
    batches = sorted({t["batch"] for t in r["timings"]})
    text += ("\n| file | .onnx bytes | " + " | ".join(f"batch {b}: ms | × fp32" for b in batches) + " |\n|---|---:|"
             + "---:|---:|" * len(batches) + "\n")
    for name in dict.fromkeys(t["name"] for t in r["timings"]):
        cells = {t["batch"]: t for t in r["timings"] if t["name"] == name}
        text += (f"| {name} | {cells[batches[0]]['onnx_bytes']:,} | "
                 + " | ".join(f"{cells[b]['ms']:.3f} | {cells[b]['speedup']:.2f}" for b in batches) + " |\n")
    return text


def parity_section(rows: list[dict]) -> str:
    """ONNX parity per zoo model and strategy (bench/parity.py)."""
    if not rows:
        return ""
    first = rows[0]
    text = ("\n## ONNX parity on every zoo model (`bench/parity.py`)\n\n"
            "Each strategy's `.zbit` exported in mode *exact* (computes the `.zbit` model's numbers) and *fast* (the "
            "default: also quantizes the residual tensors the `.zbit` keeps in float, for integer kernels), run in "
            "onnxruntime (optimizations on) on the 10,000 test images against the model `zerobit.load` rebuilds: "
            "share of equal predictions and the largest logit difference. "
            f"CPU: {first['cpu']}; fine-tune {first['epochs']} epochs (parity does not depend on it), seed "
            f"{first['seed']}; AJPQ with {first.get('options', {}).get('episodes', 60)} episodes. Accuracies are of "
            "this short fine-tune, not the models' best; a row at 10% is a collapsed model, whose parity says "
            "nothing (ADMM at 1/32 of MobileNetV2 and ViT: ADMM keeps every channel, and every channel's scales, "
            "biases and the tensors outside the layers alone take 13.2 KB of MobileNetV2's 14.3 KB budget and "
            "21.6 KB of ViT's 17.6 KB, so the weights got densities of 0.0001 and channels emptied wholesale — ViT "
            "kept 7 of its 64 residual channels. ADMM now refuses a budget below that floor before any work, as it "
            "would the ViT row, measured before); "
            "OPQ cannot reach 1/32 of those two, so both also ran at 1/16. "
            "`python bench/parity.py`\n\n| model | budget | strategy | .zbit bytes | acc % | exact: same | max diff | "
            "fast: same | max diff | exact .onnx bytes |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for r in sorted(rows, key=lambda r: (r["model"], budget_key(r["budget"]), r["strategy"])):
        e, f = r["exact"], r["fast"]
        text += (f"| {r['model']} | {r['budget']} | {r['strategy']} | {r['zbit_bytes']:,} | "
                 f"{100 * r['accuracy']:.2f} | {100 * e['agreement']:.2f}% | {e['max_abs_diff']:.1e} | "
                 f"{100 * f['agreement']:.2f}% | {f['max_abs_diff']:.1e} | {e['onnx_bytes']:,} |\n")
    return text


def tied_section(rows: list[dict]) -> str:
    """.zbit bytes of language models with tied tables, traced tied and untied (bench/tied.py)."""
    text = ("\n## Tied weights stored once (`bench/tied.py`)\n\n"
            "Hugging Face language models at their real sizes (configs, random weights: sizes do not depend on the "
            "values) whose output layer shares the token embedding's weight. The same uniform policy (every channel "
            "kept at the bits shown) sized as zerobit writes it now (the shared table once) and as `.zbit` files "
            "before version 4 stored it (twice). `python bench/tied.py`\n\n"
            "| model | bits | fp32 file | table stored twice | stored once | saved |\n|---|---:|---:|---:|---:|---:|\n")
    by = {(r["model"], r["bits"], r["tied"]): r for r in rows}
    for (model, bits, tied), r in by.items():
        if tied and (model, bits, False) in by:
            twice = by[(model, bits, False)]["zbit_bytes"]
            text += (f"| {model} | {bits} | {r['fp32_bytes'] / 1e6:.2f} MB | {twice / 1e6:.2f} MB | "
                     f"{r['zbit_bytes'] / 1e6:.2f} MB | {(twice - r['zbit_bytes']) / 1e6:.2f} MB "
                     f"({twice / r['zbit_bytes']:.2f}×) |\n")
    return text


def write_benchmarks_md(rows: list[dict] | None, path: Path) -> None:
    """Rewrite BENCHMARKS.md from `rows` (or the stored compression results) and the other stored results."""
    if rows is None:
        stored = RESULTS / "compression.json"
        rows = json.loads(stored.read_text()) if stored.exists() else []
    text = HEADER + compression_sections(rows)
    for spread in sorted(RESULTS.glob("spread_*.json")):  # one run-to-run study per strategy
        text += spread_section(json.loads(spread.read_text()))
    for name, section in (("quantizers.json", quantizer_section), ("qat_throughput.json", throughput_section)):
        if (RESULTS / name).exists():
            text += section(json.loads((RESULTS / name).read_text()))
    for proxy in sorted(RESULTS.glob("ajpq_proxy*.json")):  # one rank study per budget
        text += proxy_section(json.loads(proxy.read_text()))
    runs = RESULTS / "ajpq_runs.json"
    if runs.exists():
        text += runs_section(json.loads(runs.read_text()))
    rerank = RESULTS / "ajpq_rerank.json"
    if rerank.exists():
        text += rerank_section(json.loads(rerank.read_text()))
    sbs = RESULTS / "sbs_layers.json"
    if sbs.exists():
        text += sbs_layers_section(json.loads(sbs.read_text()))
    deploy = RESULTS / "deploy.json"
    if deploy.exists():
        text += deploy_section(json.loads(deploy.read_text()))
    if (RESULTS / "depth.json").exists():
        text += depth_section(json.loads((RESULTS / "depth.json").read_text()))
    if (RESULTS / "parity.json").exists():
        text += parity_section(json.loads((RESULTS / "parity.json").read_text()))
    if (RESULTS / "widths.json").exists():
        text += widths_section(json.loads((RESULTS / "widths.json").read_text()))
    sweeps = sorted(RESULTS.glob("sweep_*ep.json"), key=lambda p: float(p.stem[6:-2]))  # one per fine-tune budget
    if sweeps:
        text += "## Sweeps: Ray vs one run after another\n\n"
    for sweep in sweeps:
        text += sweep_section(json.loads(sweep.read_text()))
    if (RESULTS / "ajpq_workers.json").exists():
        text += ajpq_workers_section(json.loads((RESULTS / "ajpq_workers.json").read_text()))
    if (RESULTS / "tied.json").exists():
        text += tied_section(json.loads((RESULTS / "tied.json").read_text()))
    architectures = RESULTS / "architectures.json"
    if architectures.exists():
        text += architectures_section(json.loads(architectures.read_text()))
    fuzz = RESULTS / "fuzz_zbit.json"
    if fuzz.exists():
        text += fuzz_section(json.loads(fuzz.read_text()))
    path.write_text(text)

