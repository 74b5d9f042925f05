"""Run-to-run spread: one strategy at a few byte budgets, compressed again under other seeds, other torch thread
counts and the same settings repeated — how far apart two accuracies must be before a gap between strategies
means something.

Each run is `zerobit compress` of a zoo model (same policy search, same fine-tune epochs); only the seed (the
fine-tune's data order and initial state; with --seed-search the search's too), the number of torch threads (the order of float sums) or nothing (a
repeat) changes. A run whose row exists is not redone, so a killed study starts again where it stopped. Results:
bench/results/spread_STRATEGY.json and BENCHMARKS.md.

    python bench/spread.py --budgets 1/64,1/128 --seeds 0,1,2 --threads 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compression import device_name  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.cli import run_compress  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def run_key(row: dict) -> tuple:
    return row["budget"], row["seed"], row["threads"], row["repeat"]


def summarise(rows: list[dict]) -> list[dict]:
    """Per budget: the accuracies' mean, sample standard deviation and range over every run, and the largest gap
    between two runs that differ only in what the column names (seed, threads, nothing)."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        runs = [r for r in rows if r["budget"] == budget]
        acc = [100 * r["accuracy"] for r in runs]
        out.append({"budget": budget, "runs": len(runs), "mean": statistics.fmean(acc),
                    "stdev": statistics.stdev(acc) if len(acc) > 1 else None, "min": min(acc), "max": max(acc),
                    "gap_seed": _gap(runs, "seed"), "gap_threads": _gap(runs, "threads"),
                    "gap_repeat": _gap(runs, "repeat"), "file_bytes": sorted({r["file_bytes"] for r in runs})})
    return out


def _gap(runs: list[dict], field: str) -> float | None:
    """The largest accuracy gap (points) between two runs equal in every field but `field`."""
    fields = ("seed", "threads", "repeat")
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        groups.setdefault(tuple(r[f] for f in fields if f != field), []).append(100 * r["accuracy"])
    gaps = [max(a) - min(a) for a in groups.values() if len(a) > 1]
    return max(gaps) if gaps else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--strategy", default="uniform")
    ap.add_argument("--budgets", default="1/64,1/128")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="2", help="torch thread counts, each run under every one")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each (budget, seed, threads)")
    ap.add_argument("--seed-search", action="store_true",
                    help="the seed also seeds the strategy's search (AJPQ's `seed`), not only the fine-tune")
    ap.add_argument("--out", default=str(ROOT / "runs" / "spread"))
    args = ap.parse_args()
    path = RESULTS / f"spread_{args.strategy}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    same = {k: getattr(args, k) for k in ("model", "strategy", "epochs", "seed_search")}
    if record and {k: record.get(k, False) for k in same} != same:
        raise SystemExit(f"{path} holds a study of {[record.get(k) for k in same]}; move it away to start another")
    record |= same
    rows = record.setdefault("rows", [])
    done = {run_key(r) for r in rows}
    for budget in args.budgets.split(","):
        for threads in map(int, args.threads.split(",")):
            for seed in map(int, args.seeds.split(",")):
                for repeat in range(args.repeats):
                    key = (budget, seed, threads, repeat)
                    if key in done:
                        continue
                    torch.set_num_threads(threads)
                    folder = Path(args.out) / f"{budget.replace('/', 'over')}_s{seed}_t{threads}_r{repeat}"
                    start = time.perf_counter()
                    s = run_compress(args.model, "fashion-mnist", budget, args.strategy, args.epochs, str(folder),
                                     seed=seed, progress=False, device="cpu",
                                     options={"seed": seed} if args.seed_search else None)
                    rows.append({"budget": budget, "seed": seed, "threads": threads, "repeat": repeat,
                                 "accuracy": s["accuracy"], "file_bytes": s["file_bytes"],
                                 "baseline_accuracy": s["baseline_accuracy"], "device": device_name("cpu"),
                                 "seconds": time.perf_counter() - start})
                    print(f"{budget:>6} seed {seed} threads {threads} repeat {repeat}: acc "
                          f"{100 * s['accuracy']:.2f}%  {s['file_bytes']:,} B  ({rows[-1]['seconds']:.0f} s)",
                          flush=True)
                    record["summary"] = summarise(rows)
                    path.write_text(json.dumps(record, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
