"""Compression vs accuracy on ResNet-20 / Fashion-MNIST: every strategy at the same budgets and fine-tune budget.

Each (budget, strategy) run writes the .zbit file for real; `file_bytes` is the size on disk and `accuracy` the
test accuracy of the model decoded from that file's contents. The strategy `peer` is the established-tools
baseline (bench/peer.py: Torch-Pruning + float fine-tune + onnxruntime static QDQ, sized by its .onnx file).
Results merge into bench/results/compression.json by (model, budget, strategy, epochs, device), and the tables in
BENCHMARKS.md are regenerated from it.

    python bench/compression.py --strategies uniform,peer --budgets 1/16,1/32,1/64,1/128 --epochs 3 --device cpu
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.cli import parse_options, run_compress  # noqa: E402
from zerobit.device import resolve  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "compression.json"


def split_budgets(text: str) -> list[str]:
    """"1/32,latency=1/4,batch=64,threads=1" → ["1/32", "latency=1/4,batch=64,threads=1"]: a latency's options
    stay with it."""
    budgets: list[str] = []
    for part in text.split(","):
        if budgets and part.split("=")[0].strip() in ("batch", "threads", "runtime"):
            budgets[-1] += f",{part}"
        else:
            budgets.append(part)
    return budgets


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
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    ap.add_argument("--task", default="classification", choices=["classification", "distillation"],
                    help="distillation: label-free compression (rows say task; accuracy is still top-1 on test)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve(args.device))
    for budget in split_budgets(args.budgets):
        for strategy in args.strategies.split(","):
            label = args.label or strategy
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            out = Path(args.out) / f"{strategy}_{budget.replace('/', 'over').replace('=', '_')}"
            if strategy == "peer":
                from bench.peer import run_peer  # onnx + onnxruntime: pip install -e ".[bench]"

                row = run_peer(budget, args.epochs, args.seed, device, out)
            else:
                row = _zerobit_row(args, budget, strategy, label, device, out)
            row |= {"device": device, "device_name": device_name(device), "threads": torch.get_num_threads(),
                    "seed": args.seed, "epochs": args.epochs, "seconds": time.perf_counter() - start}
            label = row["strategy"]
            if "error" in row:
                print(f"{budget:>8} {label:>11}  refused: {row['error']}", flush=True)
            else:
                print(f"{budget:>8} {label:>11}  {row['file_bytes']:>9,} B  acc {100 * row['accuracy']:.2f}%  "
                      f"({row['seconds']:.0f} s)", flush=True)
            write_benchmarks_md(merge_row(RESULTS, row, row_key), ROOT / "BENCHMARKS.md")
    return 0


def merge_row(path: Path, row: dict, key: Callable[[dict], tuple]) -> list[dict]:
    """Add `row` to the JSON list in `path`, replacing the row with the same key; returns all rows.

    Read, replaced and written under a lock, so benchmark runs in parallel processes never drop each other's rows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if key(r) != key(row)] + [row]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)
    return rows


def _zerobit_row(args: argparse.Namespace, budget: str, strategy: str, label: str, device: str, out: Path) -> dict:
    row = {"model": args.model, "budget": budget, "strategy": label}
    if args.task != "classification":
        row["task"] = args.task
    try:
        s = run_compress(args.model, "fashion-mnist", budget, strategy, args.epochs, str(out), seed=args.seed,
                         progress=False, options=parse_options(args.option), device=device, task=args.task)
    except ValueError as exc:  # e.g. a budget no policy meets
        return row | {"error": str(exc)}
    s.pop("_result")
    info = {k: v for k, v in s["info"].items() if k != "rewards"}
    return row | {k: s[k] for k in ("file_bytes", "fp32_bytes", "budget_limit", "budget_unit", "accuracy",
                                    "baseline_accuracy", "bops", "macs", "fp32_bops", "fp32_macs",
                                    "seconds_by_stage")} | {"info": info} | _label_free(s)


def _label_free(s: dict) -> dict:
    """A label-free run's row reports top-1 test accuracy like every row, and its own metric beside it."""
    if "top1_accuracy" not in s:
        return {}
    return {"accuracy": s["top1_accuracy"], "baseline_accuracy": s["baseline_top1_accuracy"],
            "task_metric": s["task_metric"]}


def row_key(row: dict) -> tuple:
    """Rows of the same model, budget, strategy, fine-tune epochs, device and seed replace each other."""
    strategy = "peer" if row["strategy"].startswith("peer") else row["strategy"]
    return (row["model"], row["budget"], strategy, row.get("epochs"), row.get("device", "cpu"), row.get("task"),
            row.get("seed", 0))


def device_name(device: str) -> str:
    """What the device is, in words (GPU model, or CPU model and thread count)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{model}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(main())
