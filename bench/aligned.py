"""Kept widths rounded to multiples of 8 (`channel_multiple=8`) against free widths: the same uniform strategy, the
same budgets and fine-tune, one run; accuracy, bytes and onnxruntime latency of both, beside fp32.

Every (budget, multiple) is compressed, written as .zbit and exported twice (the default file, int4 where a layer's
channels are all ≤ 4 bits; and all-int8); then every file is timed in one process, interleaved, at each batch size.
Results: bench/results/aligned.json and the "Channel widths" section of BENCHMARKS.md.

    python bench/aligned.py --budgets 1/16,1/32,1/64,1/128 --epochs 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deploy import interleaved_ms  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.cli import run_compress  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.export.latency import cpu_name  # noqa: E402
from zerobit.export.onnx import export_onnx, parity  # noqa: E402
from zerobit.export.onnx_file import clean, export_float  # noqa: E402
from zerobit.export.runtime import load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "aligned.json"


def build(args: argparse.Namespace, splits, budget: str, multiple: int) -> dict:
    run = Path(args.out) / f"{budget.replace('/', 'over')}_m{multiple}"
    if (run / "row.json").exists():
        return json.loads((run / "row.json").read_text())
    torch.manual_seed(args.seed)
    s = run_compress(args.model, "fashion-mnist", budget, "uniform", args.epochs, str(run), seed=args.seed,
                     progress=False, device="cpu", channel_multiple=multiple)
    result = s.pop("_result")
    calib = splits.train.subset(512)
    export_onnx(run / "model.zbit", run / "model.onnx", calibration_data=calib)
    export_onnx(run / "model.zbit", run / "model_int8.onnx", calibration_data=calib, int4=False)
    reference = load(run / "model.zbit")
    row = {"budget": budget, "multiple": multiple, "epochs": args.epochs, "seed": args.seed,
           "accuracy": s["accuracy"], "zbit_bytes": s["file_bytes"], "bits": result.info.get("bits"),
           "widths": [result.policy[n].kept for n, g in result.graph.groups.items() if g.prunable],
           "macs": s["macs"], "fp32_macs": s["fp32_macs"]}
    for name in ("model", "model_int8"):
        found = parity(run / f"{name}.onnx", reference, splits.test)
        row[name] = {"onnx_bytes": (run / f"{name}.onnx").stat().st_size, "agreement": found["agreement"],
                     "max_abs_diff": found["max_abs_diff"]}
    (run / "row.json").write_text(json.dumps(row, indent=1))
    print(f"{budget:>6} ×{multiple}  acc {100 * row['accuracy']:.2f}%  .zbit {row['zbit_bytes']:,} B  widths "
          f"{row['widths']}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budgets", default="1/16,1/32,1/64,1/128")
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (torch gets 2 for the fine-tune)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "runs" / "aligned"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    splits = get_splits("fashion-mnist")
    rows = [build(args, splits, b, m) for b in args.budgets.split(",") for m in (1, args.multiple)]
    model, example = zoo.load_pretrained(args.model), zoo.example_input(args.model)
    fp32 = Path(args.out) / "fp32.onnx"
    export_float(model, example, fp32)
    import onnx

    onnx.save(clean(onnx.load(fp32)), fp32)
    files = {"fp32": fp32}
    for r in rows:
        run = Path(args.out) / f"{r['budget'].replace('/', 'over')}_m{r['multiple']}"
        files[f"{r['budget']} m{r['multiple']}"] = run / "model.onnx"
        files[f"{r['budget']} m{r['multiple']} int8"] = run / "model_int8.onnx"
    timings = {}
    for batch in (int(b) for b in args.batches.split(",")):
        timings[batch] = interleaved_ms(files, splits.test.x[:batch].numpy(), args.threads, args.reps)
        for name, ms in timings[batch].items():
            print(f"b{batch:<3} {name:>18}  {ms:8.3f} ms  ×{timings[batch]['fp32'] / ms:.2f}", flush=True)
    for r in rows:
        key = f"{r['budget']} m{r['multiple']}"
        for name, suffix in (("model", ""), ("model_int8", " int8")):
            r[name]["ms"] = {str(b): timings[b][key + suffix] for b in timings}
    result = {"model": args.model, "cpu": cpu_name(), "threads": args.threads, "epochs": args.epochs,
              "seed": args.seed, "fp32_ms": {str(b): timings[b]["fp32"] for b in timings},
              "fp32_onnx_bytes": fp32.stat().st_size, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
