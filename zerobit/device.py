"""Where zerobit computes and in which precision: one place for device names, batch moves and autocast.

A model's device decides where everything that touches it runs: training, calibration, scoring and evaluation move
each batch to the device of the model's parameters (`move`), so data may stay on the CPU.

Precision: training steps and search proxies may run under bfloat16 autocast where the device computes it natively
(CUDA GPUs with bfloat16, CPUs with AMX); the numbers a file stores — codes, scales, biases, the evaluation of the
stored model — are always computed in float32.

Example:
    >>> resolve("cpu")
    device(type='cpu')
    >>> resolve("auto").type in ("cpu", "cuda")
    True
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

DeviceLike = str | torch.device
PRECISIONS = ("auto", "float32", "bfloat16")


def resolve(device: DeviceLike | None = "auto") -> torch.device:
    """A torch.device from "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.

    Raises:
        ValueError: the name is unknown, or names a CUDA device this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def move(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, a tuple/list or a dict of them; other values pass through) on `device`; the one place
    data crosses devices."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(move(t, device) for t in batch)
    return batch


@functools.cache
def _cpu_bfloat16() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: stay in float32
        return False


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware fast enough to be worth it: CUDA GPUs that support it,
    CPUs with AMX tiles. (On CPUs with AVX512-BF16 but no AMX it measured slower than float32 for QAT steps.)"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bfloat16()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype:
    """float32 or bfloat16 for `precision` ("auto" = bfloat16 where the device runs it natively)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast on `device` when `precision` resolves to it, else nothing."""
    on = autocast_dtype(device, precision) == torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
        yield
