"""onnxruntime time of one quantized 3×3 conv by kept channel count: why `channel_multiple` exists.

Each conv is a one-layer model as `export_onnx` writes it (uint8 input, int8 weights, ReLU, uint8 output) and is
timed by the latency table's own method (`LatencyTable.kernel_ms`: the model minus the same call
without the layer, median of repeated calls). Input and output channels are equal. Results:
bench/results/widths.json and the "Channel widths" section of BENCHMARKS.md.

    python bench/widths.py --batch 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.export.latency import LatencyTable, LayerShape, _layer_model, cpu_name  # noqa: E402

SHAPES = ((28, 16), (14, 32), (7, 64))  # (side, full channels): ResNet-20's three stages on 28×28 images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    table = LatencyTable(args.batch, args.threads, path=ROOT / "runs" / "widths_table.json")  # for its sessions
    rows = []
    for side, full in SHAPES:
        shape = LayerShape("conv", full, full, 3, 1, side, side, 1)
        for c in sorted({4, 7, 8, 9, 12, 15, 16, full // 2 - 1, full // 2, full - 1, full} - {0}):
            if c > full:
                continue
            model, x = _layer_model(shape, c, c, "int8", "u8", args.batch)
            ms = table.kernel_ms(model, x)
            rows.append({"side": side, "channels": c, "ms": ms})
            print(f"{side}×{side}  {c:>3} channels  {ms:7.3f} ms", flush=True)
    out = ROOT / "bench" / "results" / "widths.json"
    out.write_text(json.dumps({"cpu": cpu_name(), "batch": args.batch, "threads": args.threads, "rows": rows},
                              indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
