"""ONNX parity on every zoo model: each strategy's .zbit exported to ONNX (modes exact and fast) and run in
onnxruntime on the 10,000 Fashion-MNIST test images, against the model `zerobit.load` rebuilds from the .zbit.

Parity does not depend on how long the model was fine-tuned, so the runs fine-tune briefly (`--epochs`); AJPQ
runs a short search (`--ajpq-episodes`). A finished run is not redone. Results: bench/results/parity.json
(merged by model, strategy and budget) and a table in BENCHMARKS.md.

    python bench/parity.py --models vgg,mobilenetv2,vit --strategies uniform,sequential,opq,admm,sbs,ajpq
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
from zerobit.cli import run_compress  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.export.latency import cpu_name  # noqa: E402
from zerobit.export.onnx import export_onnx, parity  # noqa: E402
from zerobit.export.runtime import load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "parity.json"
MODES = ("exact", "fast")


def one_run(args: argparse.Namespace, splits, model: str, strategy: str, budget: str) -> dict | None:
    """Compress (or reuse the run's files), export in both modes, and compare with the loaded .zbit."""
    run = Path(args.out) / f"{model}_{strategy}_{budget.replace('/', 'over')}"
    options = {"episodes": args.ajpq_episodes} if strategy == "ajpq" else {}
    if not (run / "model.zbit").exists():
        torch.manual_seed(args.seed)
        try:
            run_compress(model, "fashion-mnist", budget, strategy, args.epochs, str(run), seed=args.seed,
                         progress=False, options=options, device="cpu")
        except ValueError as exc:  # a budget the strategy cannot meet on this model
            print(f"{model:>12} {strategy:>10} {budget:>6}  refused: {str(exc)[:120]}", flush=True)
            return None
    summary = json.loads((run / "result.json").read_text())
    loaded = load(run / "model.zbit")
    row = {"model": model, "strategy": strategy, "budget": budget, "epochs": args.epochs, "seed": args.seed,
           "options": options, "zbit_bytes": (run / "model.zbit").stat().st_size,
           "accuracy": summary["accuracy"], "cpu": cpu_name()}
    for mode in MODES:
        t0 = time.perf_counter()
        report = export_onnx(run / "model.zbit", run / f"{mode}.onnx", mode=mode,
                             calibration_data=splits.train.subset(512))
        found = parity(run / f"{mode}.onnx", loaded, splits.test, threads=args.threads)
        row[mode] = {"agreement": found["agreement"], "max_abs_diff": found["max_abs_diff"],
                     "samples": found["samples"], "onnx_bytes": report.onnx_bytes,
                     "formats": sorted(set(report.layers.values())), "seconds": time.perf_counter() - t0}
    print(f"{model:>12} {strategy:>10} {budget:>6}  .zbit {row['zbit_bytes']:>8,} B  acc {100 * row['accuracy']:.2f}%  "
          + "  ".join(f"{m} {100 * row[m]['agreement']:.2f}% (max {row[m]['max_abs_diff']:.1e})" for m in MODES),
          flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,mobilenetv2,vit")
    ap.add_argument("--strategies", default="uniform,sequential,opq,admm,sbs,ajpq")
    ap.add_argument("--budgets", default="1/32")
    ap.add_argument("--epochs", type=float, default=0.1, help="fine-tune epochs (parity does not depend on them)")
    ap.add_argument("--ajpq-episodes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "parity"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    splits = get_splits("fashion-mnist")
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for model in args.models.split(","):
        for budget in args.budgets.split(","):
            for strategy in args.strategies.split(","):
                row = one_run(args, splits, model, strategy, budget)
                if row is None:
                    continue
                key = (model, strategy, budget)
                stored = [r for r in stored if (r["model"], r["strategy"], r["budget"]) != key] + [row]
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(stored, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
