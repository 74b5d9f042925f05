"""Deployment on onnxruntime (CPU): latency, file bytes and parity of every strategy's ONNX file beside fp32 and the
peer, the latency table's error, and a Latency budget against a MACs budget of the same measured latency.

Stage "build" compresses (fine-tune `--epochs`) and writes each run's .zbit and .onnx under --out; stage "measure"
times every file in one process, interleaved (each repetition calls every file once, in turn), median per file,
at each batch size — run it on a quiet machine. Results: bench/results/deploy.json and BENCHMARKS.md.

    python bench/deploy.py --stage build --strategies uniform,sequential,opq,admm --budgets 1/16,1/32,1/64,1/128
    python bench/deploy.py --stage measure --batches 1,64 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.budget import Latency, MACs, float_policy, parse_budget  # noqa: E402
from zerobit.cli import run_compress  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.export.latency import LatencyTable, cpu_name, measure_policies, measure_policy  # noqa: E402
from zerobit.export.onnx import export_onnx, onnx_session, parity  # noqa: E402
from zerobit.export.onnx_file import export_float  # noqa: E402
from zerobit.export.runtime import decode, load  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.strategies import Problem, get_strategy  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "deploy.json"


def build(args: argparse.Namespace, splits) -> None:
    """Compress, write .zbit and .onnx files (fast mode), record bytes, accuracy and parity. A strategy written
    "uniform:m8" runs with channel_multiple=8."""
    out = Path(args.out)
    for budget in args.budgets.split(","):
        for label in args.strategies.split(","):
            strategy, _, multiple = label.partition(":m")
            run = out / f"{label.replace(':', '_')}_{budget.replace('/', 'over')}"
            if (run / "row.json").exists():
                _variants(run, splits)
                continue
            torch.manual_seed(args.seed)
            try:
                s = run_compress(args.model, "fashion-mnist", budget, strategy, args.epochs, str(run), seed=args.seed,
                                 progress=False, device="cpu", channel_multiple=int(multiple or 1))
            except ValueError as exc:
                print(f"{budget:>6} {label:>10}  refused: {exc}", flush=True)
                continue
            s.pop("_result")
            report = export_onnx(run / "model.zbit", run / "model.onnx", calibration_data=splits.train.subset(512),
                                 mode="fast")
            found = parity(run / "model.onnx", load(run / "model.zbit"), splits.test)
            row = {"model": args.model, "budget": budget, "strategy": label.replace(":", " "), "epochs": args.epochs,
                   "seed": args.seed, "zbit_bytes": report.zbit_bytes, "onnx_bytes": report.onnx_bytes,
                   "accuracy": s["accuracy"], "onnx_agreement": found["agreement"],
                   "onnx_max_abs_diff": found["max_abs_diff"], "macs": s["macs"], "fp32_macs": s["fp32_macs"],
                   "formats": sorted(set(report.layers.values()))}
            (run / "row.json").write_text(json.dumps(row, indent=1))
            _variants(run, splits)
            print(f"{budget:>6} {strategy:>10}  .zbit {row['zbit_bytes']:>7,} B  .onnx {row['onnx_bytes']:>7,} B  "
                  f"acc {100 * row['accuracy']:.2f}%  parity {100 * found['agreement']:.2f}%", flush=True)


VARIANTS = {"int8": {"int4": False, "mode": "fast"}, "exact": {"mode": "exact"}}  # file suffix → export_onnx


def _variants(run: Path, splits) -> None:
    """The same .zbit exported other ways, each with its parity: "int8" (where the file has int4 layers: them as
    int8, larger, integer kernels throughout) and "exact" (computes the .zbit model's numbers)."""
    row = json.loads((run / "row.json").read_text())
    for name, options in VARIANTS.items():
        if (run / f"{name}.json").exists() or (name == "int8" and "int4" not in row["formats"]):
            continue
        export_onnx(run / "model.zbit", run / f"model_{name}.onnx", calibration_data=splits.train.subset(512),
                    **options)
        found = parity(run / f"model_{name}.onnx", load(run / "model.zbit"), splits.test)
        (run / f"{name}.json").write_text(json.dumps({"onnx_agreement": found["agreement"],
                                                      "onnx_max_abs_diff": found["max_abs_diff"]}))


def peer_files(args: argparse.Namespace, splits, model, example) -> dict[str, Path]:
    """The peer's ONNX file (Torch-Pruning + onnxruntime static QDQ) at each budget it can meet: the same graph
    its fine-tuned file has (pruning ratio from the size search; latency does not depend on the weights)."""
    from bench.peer import build_file, least_pruning, prune

    graph = analyse(model, example)
    images = splits.train.x[:256].numpy()
    files = {}
    for budget in args.budgets.split(","):
        limit = parse_budget(budget).limit(graph)
        best = None
        for fmt in ("int8", "int4"):
            work = Path(args.out) / "peer" / budget.replace("/", "over")
            work.mkdir(parents=True, exist_ok=True)
            ratio, _ = least_pruning(model, example, fmt, images, limit, work)
            if ratio is not None and (best is None or ratio < best[1]):
                best = (fmt, ratio)
        if best is None:
            print(f"{budget:>6} peer: no file fits", flush=True)
            continue
        path = Path(args.out) / "peer" / f"{budget.replace('/', 'over')}_{best[0]}.onnx"
        build_file(prune(model, example, best[1]), example, best[0], images, path)
        files[f"peer {best[0]} {budget}"] = path
    return files


def interleaved_ms(files: dict[str, Path], x: np.ndarray, threads: int, reps: int) -> dict[str, float]:
    """Median ms per call of each file: every repetition calls every file once, in turn."""
    sessions = {name: onnx_session(path, threads) for name, path in files.items()}
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(reps):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: float(np.median(t)) for name, t in times.items()}


def latency_budget_rows(args, splits, model, example) -> list[dict]:
    """Uniform under Latency(fraction of fp32, batch 64) for each of --latency-fractions, against uniform under
    the MACs budget whose measured latency is the same (bisected), both fine-tuned for --epochs and both at the
    widths the Latency run searched (`channel_multiple`: 8 where such widths reach the budget, given to the MACs
    run too, so the rows differ by what the budget measures alone): accuracy at equal measured latency."""
    rows, graph = [], analyse(model, example)
    for text in args.latency_fractions.split(","):
        out = Path(args.out) / f"latency_{text.replace('/', '-')}"
        lat = run_compress(args.model, "fashion-mnist", f"latency={text},batch=64,threads={args.threads}", "uniform",
                           args.epochs, str(out), seed=args.seed, progress=False, device="cpu")
        target, multiple = lat["info"]["latency_ms"], lat["channel_multiple"]
        setting = {"channel_multiple": multiple, "epochs": args.epochs, "seed": args.seed}
        pair = [{"budget": f"latency={text} ({lat['budget_limit']:.2f} ms)", "strategy": "uniform",
                 "accuracy": lat["accuracy"], "search_measured_ms": target,
                 "predicted_ms": lat["info"]["latency_predicted_ms"], "macs": lat["macs"]} | setting]
        macs_row, macs_out = _macs_row(args, splits, model, graph, example, target, multiple)
        pair.append(macs_row | setting)
        # both files timed again together, in turns: a slow moment of the machine slows both alike
        both = [decode(folder / "model.zbit")[1].policy for folder in (out, macs_out)]
        for row, ms in zip(pair, measure_policies(model, graph, both, example, splits.train, 64, args.threads,
                                                  seconds=4.0, rounds=8), strict=True):
            row["measured_ms"] = ms
        pair[1]["matched"] = pair[1]["measured_ms"] <= 1.1 * pair[0]["measured_ms"]
        rows += pair
    return rows


def _macs_row(args, splits, model, graph, example, target: float, multiple: int) -> tuple[dict, Path]:
    """Uniform under the MACs fraction whose policy measures `target` ms (bisected on exported policies),
    fine-tuned: its row and its run's folder."""
    from zerobit.importance import group_scores

    problem = Problem(model, graph, MACs(fraction=0.5), example, splits.train, splits.val,
                      group_scores(model, graph), 8, channel_multiple=multiple)
    low, high = 0.01, 1.0  # MACs fractions: measured latency rises with the fraction
    for _ in range(7):
        mid = (low + high) / 2
        policy = get_strategy("uniform").search(dataclasses.replace(problem, budget=MACs(fraction=mid))).policy
        ms = measure_policy(model, graph, policy, example, splits.train, 64, args.threads)
        low, high = (mid, high) if ms <= target else (low, mid)
    out = Path(args.out) / f"macs_{low:.4f}"
    macs = run_compress(args.model, "fashion-mnist", f"macs={low:.4f}", "uniform", args.epochs, str(out),
                        seed=args.seed, progress=False, device="cpu", channel_multiple=multiple)
    return {"budget": f"macs={low:.3f}", "strategy": "uniform", "accuracy": macs["accuracy"],
            "macs": macs["macs"]}, out


TABLE_POLICIES = ((1.0, 8), (0.75, 8), (0.75, 6), (0.6, 8), (0.5, 5), (0.5, 4), (0.4, 6), (0.3, 8), (0.25, 2))  # keep, bits


def _widths(policy) -> tuple:
    """What decides a policy's latency: each group's kept channels and their bits (not which channels)."""
    return tuple((name, tuple(sorted(d.bits))) for name, d in sorted(policy.groups.items()))


def table_check(args: argparse.Namespace, splits) -> list[dict]:
    """The latency table against whole-model timings: uniform policies of every zoo model, with widths as they fall
    and rounded to multiples of 8, each exported (weights as calibrated, not fine-tuned: latency does not depend on
    their values) and timed interleaved with the others (`interleaved_ms`: a busy moment of the machine slows every
    file alike). Predicted as a Latency budget predicts: the table times a scale fitted to the model's
    `calibration_policies` (`Latency.calibrated`; those rows are marked and left out of the errors, and policies
    of the same widths and bits are not timed again). Beside it, the error of the earlier scale, set on the
    3/4 calibration policy alone."""
    import tempfile

    from zerobit.budget import CALIBRATION_KEEP, calibration_policies
    from zerobit.export.latency import export_policy
    from zerobit.importance import group_scores
    from zerobit.policy import uniform_policy

    rows = []
    for name in ("resnet20", "vgg", "mobilenetv2"):
        model, example = zoo.load_pretrained(name), zoo.example_input(name)
        graph = analyse(model, example)
        scores = group_scores(model, graph)
        calibration = dict(zip(CALIBRATION_KEEP, calibration_policies(graph), strict=True))
        policies = {(f"calibration_{keep}", keep, 8, 8): p for keep, p in calibration.items()}
        widths = {_widths(p) for p in policies.values()}
        for keep, bits in TABLE_POLICIES:
            for m in (1, 8):
                policy = uniform_policy(graph, scores, keep, bits, 8, multiple=m)
                if _widths(policy) not in widths:  # the same widths and bits as a calibration policy: not counted
                    policies[(f"{keep}_{bits}_m{m}", keep, bits, m)] = policy
        with tempfile.TemporaryDirectory() as tmp:
            files = {key[0]: export_policy(model, graph, policy, example, splits.train, f"{tmp}/{key[0]}.onnx")
                     for key, policy in policies.items()}
            for batch in (int(b) for b in args.batches.split(",")):
                reps = args.reps * (10 if batch == 1 else 1)  # batch 1: calls of under a millisecond
                timed = interleaved_ms(files, splits.test.x[:batch].numpy(), args.threads, reps)
                plain = Latency(ms=1.0, batch=batch, threads=args.threads)
                budget = plain.calibrated(graph, list(calibration.values()),
                                          [timed[f"calibration_{keep}"] for keep in calibration])
                single = plain.calibrated(graph, [calibration[0.75]], [timed["calibration_0.75"]])
                for (key, keep, bits, multiple), policy in policies.items():
                    measured, predicted = timed[key], budget.cost(graph, policy)
                    rows.append({"model": name, "batch": batch, "keep": keep, "bits": bits, "multiple": multiple,
                                 "measured_ms": measured, "predicted_ms": predicted,
                                 "table_ms": budget.table().predict(graph, policy), "error": predicted / measured - 1,
                                 "single_error": single.cost(graph, policy) / measured - 1,
                                 "calibration": key.startswith("calibration")})
                    print(f"{name:>12} b{batch:<3} keep {keep:.2f} {bits}b ×{multiple}  measured {measured:8.3f} ms  "
                          f"predicted {predicted:8.3f} ms  ({100 * rows[-1]['error']:+.0f}%; one-policy scale "
                          f"{100 * rows[-1]['single_error']:+.0f}%)", flush=True)
    return rows


def measure(args: argparse.Namespace, splits) -> dict:
    torch.set_num_threads(max(1, args.threads))
    model, example = zoo.load_pretrained(args.model), zoo.example_input(args.model)
    graph = analyse(model, example)
    out = Path(args.out)
    export_float(model, example, out / "fp32.onnx")
    files = {"fp32": out / "fp32.onnx"}
    rows = {}
    for row_file in sorted(out.glob("*/row.json")):
        row = json.loads(row_file.read_text())
        name = f"{row['strategy']} {row['budget']}"
        files[name], rows[name] = row_file.parent / "model.onnx", row
        for variant in VARIANTS:
            if (row_file.parent / f"{variant}.json").exists():
                files[f"{name} {variant}"] = row_file.parent / f"model_{variant}.onnx"
                rows[f"{name} {variant}"] = row | json.loads((row_file.parent / f"{variant}.json").read_text())
    files |= peer_files(args, splits, model, example)
    result = {"model": args.model, "cpu": cpu_name(), "threads": args.threads, "epochs": args.epochs,
              "seed": args.seed, "rows": [], "latency_table": [], "latency_budget": []}
    for batch in (int(b) for b in args.batches.split(",")):
        x = splits.test.x[:batch].numpy()
        timed = interleaved_ms(files, x, args.threads, args.reps)
        table = LatencyTable(batch, args.threads)
        for name, ms in timed.items():
            row = rows.get(name, {}) | {"name": name, "batch": batch, "ms": ms, "speedup": timed["fp32"] / ms,
                                        "onnx_bytes": files[name].stat().st_size}
            if (name in rows or name == "fp32") and not name.endswith("exact"):  # the table models fast files
                policy = float_policy(graph) if name == "fp32" else \
                    decode(files[name].parent / "model.zbit")[1].policy
                row["predicted_ms"] = table.predict(graph, policy, int4=not name.endswith("int8"))
                row["table_error"] = row["predicted_ms"] / ms - 1
            result["rows"].append(row)
            print(f"b{batch:<3} {name:>22}  {ms:8.3f} ms  ×{row['speedup']:.2f}  {row['onnx_bytes']:>8,} B"
                  + (f"  predicted {row['predicted_ms']:.3f} ms ({100 * row['table_error']:+.0f}%)"
                     if "predicted_ms" in row else ""), flush=True)
    result["table_check"] = table_check(args, splits)
    if args.latency_budget:
        result["latency_budget"] = latency_budget_rows(args, splits, model, example)
        for r in result["latency_budget"]:
            print(f"{r['budget']:>24} uniform  acc {100 * r['accuracy']:.2f}%  measured {r['measured_ms']:.3f} ms")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="all", choices=["build", "measure", "latency", "table", "all"],
                    help="latency: only the Latency-vs-MACs rows; table: only the latency table's check; both merged "
                         "into the stored results")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--strategies", default="uniform,sequential,opq,admm")
    ap.add_argument("--budgets", default="1/16,1/32,1/64,1/128")
    ap.add_argument("--epochs", type=float, default=0.25, help="fine-tune epochs of every compressed model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime (and torch) threads")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--latency-budget", action="store_true", help="also compare Latency with MACs budgets")
    ap.add_argument("--latency-fractions", default="1/4", help="Latency budgets (fractions of fp32's) compared")
    ap.add_argument("--out", default=str(ROOT / "runs" / "deploy"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    splits = get_splits("fashion-mnist")
    if args.stage in ("build", "all"):
        build(args, splits)
    if args.stage == "table":
        result = json.loads(RESULTS.read_text())
        result["table_check"] = table_check(args, splits)
        result["table_cpu"] = cpu_name()
        RESULTS.write_text(json.dumps(result, indent=1))
        write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    if args.stage == "latency":
        result = json.loads(RESULTS.read_text())
        model, example = zoo.load_pretrained(args.model), zoo.example_input(args.model)
        result["latency_budget"] = latency_budget_rows(args, splits, model, example)
        RESULTS.write_text(json.dumps(result, indent=1))
        write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    if args.stage in ("measure", "all"):
        result = measure(args, splits)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1))
        write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
