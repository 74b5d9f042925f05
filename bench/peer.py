"""Peer baseline: what a user gets from established tools at the same size budget as zerobit.

Protocol, per weight format (int8 or int4 per-channel weights, uint8 activations, static QDQ, opset 21):
1. size search: bisect Torch-Pruning's uniform L2-magnitude pruning ratio (the final Linear kept whole) for the
   least pruning whose final .onnx file fits the budget; each probe exports, quantizes and cleans a real file
   of the pretrained model (its size depends on the channel counts alone: every tensor is stored raw);
2. prune the pretrained model at that ratio and fine-tune it in float with zerobit's own loop and distillation
   recipe for the same epochs zerobit gets;
3. export to ONNX, quantize with onnxruntime's `quantize_static` (calibrated on training images), clean the file
   losslessly (no doc strings, metadata or inner shape hints; short names) and test it with onnxruntime.
The row reports the best-accuracy format that fits; `file_bytes` is the final file's size on disk. It runs as the
strategy `peer` of the compression benchmark, in the same run as zerobit's strategies:

    python bench/compression.py --strategies uniform,peer --budgets 1/16,1/32,1/64,1/128 --epochs 3
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zerobit import zoo  # noqa: E402
from zerobit.budget import Size, parse_budget  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.data.loaders import TensorData  # noqa: E402
from zerobit.export.onnx_file import clean, export_float, quiet  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.train.evaluate import accuracy  # noqa: E402
from zerobit.train.finetune import FinetuneConfig, finetune  # noqa: E402

MODEL = "resnet20"
STRATEGY = "peer: torch-pruning + ORT"
RATIO_STEP = 1 / 128  # the bisection's grid: finer than one channel of resnet20's widest (64-channel) layers
MAX_STEPS = 121  # ratio ≈ 0.95: beyond it uniform pruning leaves layers of one or two channels
CALIBRATION_IMAGES = 256
EVAL_BATCH = 500


def prune(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of `model` with `ratio` of every group's channels removed (L2 magnitude, last Linear kept)."""
    pruned = copy.deepcopy(model).cpu().eval()
    if ratio > 0:
        last_linear = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1:]
        tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
                             pruning_ratio=ratio, global_pruning=False, ignored_layers=last_linear).step()
    return pruned.eval()


def quantize(float_path: Path, out_path: Path, fmt: str, images: np.ndarray) -> None:
    """onnxruntime static QDQ: per-channel `fmt` weights, uint8 activations calibrated (min/max) on `images`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": images[i:i + 64]} for i in range(0, len(images), 64)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    weight_type = {"int8": QuantType.QInt8, "int4": QuantType.QInt4}[fmt]
    with quiet():
        quantize_static(str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weight_type)


def build_file(model: nn.Module, example: torch.Tensor, fmt: str, images: np.ndarray, path: Path,
               float_path: Path | None = None) -> int:
    """Export (unless `float_path` holds the export already), quantize and clean `model` into `path`; its bytes."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        if float_path is None:
            float_path = Path(tmp) / "float.onnx"
            export_float(model, example, float_path)
        quantize(float_path, Path(tmp) / "quant.onnx", fmt, images)
        cleaned = clean(onnx.load(str(Path(tmp) / "quant.onnx")))
    onnx.checker.check_model(cleaned, full_check=True)
    onnx.save(cleaned, str(path))
    return path.stat().st_size


def least_pruning(model: nn.Module, example: torch.Tensor, fmt: str, images: np.ndarray, limit: float,
                  work: Path) -> tuple[float | None, int]:
    """Bisect the least ratio whose file fits `limit` bytes: (ratio, bytes), or (None, bytes at MAX_STEPS).

    Ratios are multiples of RATIO_STEP; the float exports in `work` are reused across formats.
    """
    @functools.cache
    def size(step: int) -> int:
        pruned = prune(model, example, step * RATIO_STEP)
        float_path = work / f"probe_{step}.onnx"
        if not float_path.exists():
            export_float(pruned, example, float_path)
        return build_file(pruned, example, fmt, images, work / f"probe_{fmt}.onnx", float_path)

    if size(0) <= limit:
        return 0.0, size(0)
    if size(MAX_STEPS) > limit:
        return None, size(MAX_STEPS)
    low, high = 0, MAX_STEPS  # the file at `low` is too big, the one at `high` fits
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if size(mid) <= limit else (mid, high)
    return high * RATIO_STEP, size(high)


def onnx_accuracy(path: Path, data: TensorData) -> float:
    """Test accuracy of an ONNX file under onnxruntime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x, y = data.x.numpy(), data.y.numpy()
    correct = sum(int((session.run(None, {name: x[i:i + EVAL_BATCH]})[0].argmax(1) == y[i:i + EVAL_BATCH]).sum())
                  for i in range(0, len(x), EVAL_BATCH))
    return correct / len(x)


def _finetune(model: nn.Module, teacher: nn.Module, train: TensorData, epochs: float, seed: int, device: str,
              progress: bool) -> None:
    """zerobit's fine-tune (distillation from `teacher`) of `model` in float on `device`; leaves it on the CPU."""
    model.to(device)
    teacher = copy.deepcopy(teacher).to(device)
    finetune(model, train, FinetuneConfig(epochs=epochs, seed=seed), teacher=teacher, progress=progress)
    model.cpu().eval()


def run_peer(budget: str, epochs: float, seed: int = 0, device: str = "cpu",
             out_dir: str | Path = ROOT / "runs" / "peer", formats: tuple[str, ...] = ("int8", "int4"),
             progress: bool = False, test_limit: int | None = None) -> dict:
    """The peer's row at one size budget (e.g. "1/32" of the fp32 bytes), for resnet20 on Fashion-MNIST."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    splits = get_splits("fashion-mnist")
    model, example = zoo.load_pretrained(MODEL), zoo.example_input(MODEL)
    graph = analyse(model.eval(), example)  # the fp32 reference zerobit's rows use
    size_budget = parse_budget(budget)
    if not isinstance(size_budget, Size):
        raise ValueError(f"the peer takes size budgets only (like 1/32 or 40KB), not {budget!r}")
    limit = size_budget.limit(graph)
    test = splits.test if test_limit is None else splits.test.subset(test_limit)
    picks = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
    images = splits.train.x[picks].numpy()  # (256, 1, 28, 28)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as probes:
        searched = {fmt: least_pruning(model, example, fmt, images, limit, Path(probes)) for fmt in formats}
    stage = {"search": time.perf_counter() - t0, "finetune": 0.0}
    out = Path(out_dir) / budget.replace("/", "over")
    out.mkdir(parents=True, exist_ok=True)
    found: dict[str, dict] = {}
    tuned: dict[float, nn.Module] = {}  # formats that chose the same ratio share one fine-tuned model
    for fmt, (ratio, nbytes) in searched.items():
        if ratio is None:
            found[fmt] = {"infeasible": nbytes}
            continue
        if ratio not in tuned:
            t0 = time.perf_counter()
            tuned[ratio] = prune(model, example, ratio)
            _finetune(tuned[ratio], model, splits.train, epochs, seed, device, progress)
            stage["finetune"] += time.perf_counter() - t0
        nbytes = build_file(tuned[ratio], example, fmt, images, out / f"{fmt}.onnx")
        if nbytes > limit:
            raise RuntimeError(f"{fmt}: the fine-tuned file is {nbytes} B, over the {limit:.0f} B its probe fitted")
        macs, _ = tp.utils.count_ops_and_params(tuned[ratio], example)
        found[fmt] = {"ratio": ratio, "file_bytes": nbytes, "accuracy": onnx_accuracy(out / f"{fmt}.onnx", test),
                      "macs": int(macs)}
    row = {"model": MODEL, "budget": budget, "strategy": STRATEGY, "epochs": epochs, "device": device, "seed": seed,
           "fp32_bytes": graph.fp32_bytes, "budget_limit": limit, "budget_unit": "bytes"}
    fitting = [fmt for fmt in formats if "accuracy" in found[fmt]]
    if not fitting:
        smallest = min(f["infeasible"] for f in found.values())
        return {**row, "error": f"infeasible: smallest peer file is {smallest} bytes (> budget {limit:.0f})",
                "seconds": time.perf_counter() - start, "info": {"formats": found}}
    best = max(fitting, key=lambda fmt: found[fmt]["accuracy"])
    return {**row, "strategy": f"{STRATEGY} {best}", "file_bytes": found[best]["file_bytes"],
            "accuracy": found[best]["accuracy"], "baseline_accuracy": accuracy(model, test),
            "seconds": time.perf_counter() - start, "seconds_by_stage": stage,
            "info": {"formats": found, "pruning_ratio": found[best]["ratio"]}}


