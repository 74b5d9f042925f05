"""Compression vs accuracy on ResNet-20 / Fashion-MNIST: every strategy at the same budgets and fine-tune budget.

Each (budget, strategy) run writes the .zbit file for real; `file_bytes` is the size on disk and `accuracy` the
test accuracy of the model decoded from that file's contents. Results merge into bench/results/compression.json
and the table in BENCHMARKS.md is regenerated from it.

    python bench/compression.py --strategies uniform,sequential --budgets 1/16,1/32,1/64,1/128 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.cli import parse_options, run_compress  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "compression.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--strategies", default="uniform,sequential")
    ap.add_argument("--budgets", default="1/16,1/32,1/64,1/128")
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs, the same for every strategy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="strategy option")
    ap.add_argument("--label", default="", help="name of the row's strategy column (default: the strategy)")
    args = ap.parse_args()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for budget in args.budgets.split(","):
        for strategy in args.strategies.split(","):
            label = args.label or strategy
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            out = Path(args.out) / f"{strategy}_{budget.replace('/', 'over').replace('=', '_')}"
            try:
                s = run_compress(args.model, "fashion-mnist", budget, strategy, args.epochs, str(out),
                                 seed=args.seed, progress=False, options=parse_options(args.option))
            except ValueError as exc:  # e.g. a budget no policy meets
                row = {"model": args.model, "budget": budget, "strategy": label, "error": str(exc)}
                print(f"{budget:>8} {strategy:>11}  refused: {exc}")
            else:
                s.pop("_result")
                info = {k: v for k, v in s["info"].items() if k != "rewards"}
                row = {"model": args.model, "budget": budget, "strategy": label, "epochs": args.epochs,
                       "file_bytes": s["file_bytes"], "fp32_bytes": s["fp32_bytes"],
                       "budget_limit": s["budget_limit"], "budget_unit": s["budget_unit"],
                       "accuracy": s["accuracy"], "baseline_accuracy": s["baseline_accuracy"], "bops": s["bops"],
                       "macs": s["macs"], "fp32_bops": s["fp32_bops"], "fp32_macs": s["fp32_macs"],
                       "seconds": time.perf_counter() - start, "seconds_by_stage": s["seconds_by_stage"],
                       "info": info}
                print(f"{budget:>8} {label:>11}  {row['file_bytes']:>9,} B  acc {100 * row['accuracy']:.2f}%  "
                      f"({row['seconds']:.0f} s)", flush=True)
            rows = [r for r in rows if (r["model"], r["budget"], r["strategy"]) != (args.model, budget, label)]
            rows.append(row)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(rows, indent=1))
            write_benchmarks_md(rows, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
