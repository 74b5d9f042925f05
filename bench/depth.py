"""Depth pruning on onnxruntime: residual branches removed whole against the same strategy keeping them, at one
byte budget — accuracy after the fine-tune, .zbit and .onnx bytes, parity, and latency beside fp32 and the peer.

Each run compresses a zoo model (`uniform` with `channel_multiple=8`, the fastest widths; `empty=` names the
branches removed whole), exports it as `export_onnx` writes it (mode fast: int4 where every channel has ≤ 4 bits)
and as int8 (the same codes in int8: a larger file, integer kernels throughout), and checks parity with the
.zbit model on the test set. Then every file, fp32's and the peer's (Torch-Pruning + onnxruntime static QDQ at the
same byte budget) are timed in one process, interleaved, median per file, at each batch size. Results:
bench/results/depth.json and BENCHMARKS.md.

    python bench/depth.py --budget 1/64 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deploy import interleaved_ms, peer_files  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.cli import run_compress  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.export.latency import cpu_name  # noqa: E402
from zerobit.export.onnx import export_onnx, parity  # noqa: E402
from zerobit.export.onnx_file import export_float  # noqa: E402
from zerobit.export.runtime import load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "depth.json"
RUNS = {  # label → uniform's options
    "uniform": {},
    "uniform, layer1.0–1 removed": {"empty": "layer1.0,layer1.1"},
    "uniform, layer1 removed": {"empty": "layer1"},
}
FORMATS = {"fast": {}, "int8": {"int4": False}}  # file suffix → export_onnx options


def build(args: argparse.Namespace, splits) -> list[dict]:
    """Compress, export and check every run (a run whose row exists is not redone)."""
    rows = []
    for label, options in RUNS.items():
        run = Path(args.out) / label.split(",")[-1].strip().replace(" ", "_").replace("–", "-")
        if (run / "row.json").exists():
            rows.append(json.loads((run / "row.json").read_text()))
            continue
        s = run_compress(args.model, "fashion-mnist", args.budget, "uniform", args.epochs, str(run), seed=args.seed,
                         progress=False, device="cpu", channel_multiple=8, options=options)
        result = s.pop("_result")
        row = {"label": label, "model": args.model, "budget": args.budget, "epochs": args.epochs, "seed": args.seed,
               "accuracy": s["accuracy"], "baseline_accuracy": s["baseline_accuracy"], "zbit_bytes": s["file_bytes"], "macs": s["macs"],
               "fp32_macs": s["fp32_macs"], "removed": sorted(result.policy.removed_layers(result.graph)),
               "files": {}}
        for name, fmt in FORMATS.items():
            path = run / f"model_{name}.onnx"
            report = export_onnx(run / "model.zbit", path, calibration_data=splits.train.subset(512), **fmt)
            found = parity(path, load(run / "model.zbit"), splits.test)
            row["files"][name] = {"path": str(path), "onnx_bytes": report.onnx_bytes,
                                  "agreement": found["agreement"], "max_abs_diff": found["max_abs_diff"]}
        (run / "row.json").write_text(json.dumps(row, indent=1))
        print(f"{label:>32}  acc {100 * row['accuracy']:.2f}%  .zbit {row['zbit_bytes']:,} B  removed "
              f"{len(row['removed'])} layers", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budget", default="1/64")
    ap.add_argument("--epochs", type=float, default=3.0, help="fine-tune epochs of every compressed model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (torch: --torch-threads)")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch threads while compressing (0 = default)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "runs" / "depth"))
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    splits = get_splits("fashion-mnist")
    rows = build(args, splits)
    torch.set_num_threads(max(1, args.threads))
    model, example = zoo.load_pretrained(args.model), zoo.example_input(args.model)
    export_float(model, example, Path(args.out) / "fp32.onnx")
    files = {"fp32": Path(args.out) / "fp32.onnx"}
    for row in rows:
        files |= {f"{row['label']} ({name})": Path(f["path"]) for name, f in row["files"].items()}
    peer_args = argparse.Namespace(budgets=args.budget, out=args.out)
    files |= peer_files(peer_args, splits, model, example)
    result = {"model": args.model, "budget": args.budget, "cpu": cpu_name(), "threads": args.threads,
              "epochs": args.epochs, "seed": args.seed, "runs": rows, "timings": []}
    for batch in (int(b) for b in args.batches.split(",")):
        timed = interleaved_ms(files, splits.test.x[:batch].numpy(), args.threads, args.reps)
        for name, ms in timed.items():
            result["timings"].append({"name": name, "batch": batch, "ms": ms, "speedup": timed["fp32"] / ms,
                                      "onnx_bytes": files[name].stat().st_size})
            print(f"b{batch:<3} {name:>40}  {ms:8.3f} ms  ×{timed['fp32'] / ms:.2f}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
