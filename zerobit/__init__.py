"""zerobit: joint pruning + quantization — pruning is quantization to 0 bits — under a budget in real bytes.

Example:
    >>> import zerobit as zb
    >>> # result = zb.compress(model, example_inputs=x, budget=zb.Size(kilobytes=40), strategy="sequential",
    >>> #                      train_data=splits.train, eval_data=splits.val, test_data=splits.test)
    >>> # zb.save(result, "small.zbit"); small = zb.load("small.zbit", model)
    >>> # zb.export_onnx(result, "small.onnx")   # onnxruntime-ready: pruned widths, int8/int4 QDQ
"""

from __future__ import annotations

import os

from zerobit.api import CompressResult, compress
from zerobit.budget import BOPs, BudgetError, Latency, MACs, Size, parse_budget
from zerobit.export.onnx import OnnxReport, export_onnx
from zerobit.export.runtime import load, read_zbit
from zerobit.export.zbit import ZbitFormatError
from zerobit.graph import UntraceableModelError, analyse
from zerobit.policy import GroupDecision, Policy
from zerobit.strategies import STRATEGIES, Sequential, Uniform, register_strategy
from zerobit.sweeps import sweep
from zerobit.task import Classification, Distillation, Task
from zerobit.train.finetune import FinetuneConfig

__version__ = "0.1.0"


def save(result: CompressResult, path: str | os.PathLike) -> int:
    """Write `result` as a .zbit file; returns the bytes written (what the Size budget promised)."""
    return result.save(path)


__all__ = ["BOPs", "BudgetError", "Classification", "CompressResult", "Distillation", "FinetuneConfig",
           "GroupDecision", "Latency", "MACs", "OnnxReport", "Policy", "STRATEGIES", "Sequential", "Size", "Task",
           "Uniform", "UntraceableModelError",
           "ZbitFormatError", "analyse", "compress", "export_onnx", "load", "parse_budget", "read_zbit",
           "register_strategy", "save", "sweep"]
