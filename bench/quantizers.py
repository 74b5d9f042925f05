"""Quantizers compared: MSE-clipped max scaling vs learned step sizes (LSQ), same policies, same fine-tune.

For each budget the policy is searched once (it does not depend on the quantizer) and fine-tuned with each
quantizer from the same start, seed and epochs; every row writes its .zbit file and reports the test accuracy of
the model decoded from it. Results → bench/results/quantizers.json and a table in BENCHMARKS.md.

    python bench/quantizers.py --cases 1/12@4,1/16@3,1/32@2 --epochs 1 --device cpu

A case BUDGET@BITS is the uniform policy at that budget with every kept channel at BITS bits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compression import device_name, merge_row  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.cli import run_compress  # noqa: E402
from zerobit.device import resolve  # noqa: E402
from zerobit.train.finetune import QUANTIZERS  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quantizers.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1/12@4,1/16@3,1/32@2", help="BUDGET@BITS of the uniform policy, ...")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "quantizers"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve(args.device))
    for case in args.cases.split(","):
        budget, _, bits = case.partition("@")
        strategy = f"uniform, {bits} bits"
        for quantizer in QUANTIZERS:
            start = time.perf_counter()
            out = Path(args.out) / f"{quantizer}_{budget.replace('/', 'over')}"
            s = run_compress("resnet20", "fashion-mnist", budget, "uniform", args.epochs, str(out), seed=args.seed,
                             progress=False, options={"bits": int(bits)}, device=device,
                             finetune={"quantizer": quantizer})
            s.pop("_result")
            row = {"budget": budget, "strategy": strategy, "quantizer": quantizer, "epochs": args.epochs,
                   "seed": args.seed, "device": device, "device_name": device_name(device),
                   "file_bytes": s["file_bytes"], "accuracy": s["accuracy"], "bits": _bits(out),
                   "seconds": time.perf_counter() - start}
            print(f"{budget:>6} {quantizer:>4} {row['file_bytes']:>8,} B  {row['bits']:>10}  "
                  f"acc {100 * row['accuracy']:.2f}%  ({row['seconds']:.0f} s)", flush=True)
            merge_row(RESULTS, row, lambda r: (r["budget"], r["strategy"], r["quantizer"], r["epochs"], r["device"]))
            write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


def _bits(out: Path) -> str:
    """The weight bit-widths the stored policy uses (e.g. "2 bits", or "2/4 bits" when mixed)."""
    from zerobit.policy import Policy

    policy = Policy.load(str(out / "policy.json"))
    widths = sorted({b for d in policy.groups.values() for b in d.bits if b > 0})
    return "/".join(map(str, widths)) + " bits"


if __name__ == "__main__":
    sys.exit(main())
