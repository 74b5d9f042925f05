"""Calibration after a policy is applied: activation ranges and BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from zerobit.device import model_device
from zerobit.quant.modules import ActQuant
from zerobit.quant.uniform import FLOAT_BITS
from zerobit.task import Task, call, get_task


def run_on(model: nn.Module, batch: Any, device: torch.device, task: Task | None = None) -> Any:
    """Run `model` on the inputs of `batch` (labels, if any, left out), moved to `device`."""
    task = get_task(task)
    return call(model, task.inputs(task.to_device(batch, device)))


@torch.no_grad()
def input_ranges(model: nn.Module, modules: list[nn.Module], batches: Iterable, max_batches: int = 8,
                 percentile: float = 0.9999, task: Task | None = None) -> dict[nn.Module, tuple[float, bool]]:
    """For each of `modules`: a high percentile of |input| (averaged over batches) and whether inputs go negative,
    seen while `model` runs on up to `max_batches` batches in eval mode."""
    stats: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}
    signed: dict[nn.Module, bool] = dict.fromkeys(modules, False)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        sample = x.abs().flatten()
        if sample.numel() > 200_000:
            pick = torch.randint(sample.numel(), (200_000,), generator=torch.Generator().manual_seed(0))
            sample = sample[pick.to(sample.device)]  # with replacement: a permutation of millions cost ~70 ms per call
        stats[module].append(torch.quantile(sample.float(), percentile))
        signed[module] = signed[module] or bool((x < 0).any())

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    was_training, device = model.training, model_device(model)
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            run_on(model, batch, device, task)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if any(not v for v in stats.values()):
        raise ValueError("calibration saw no data: pass at least one batch")
    return {m: (float(torch.stack(stats[m]).mean().clamp_min(1e-8)), signed[m]) for m in modules}


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable, max_batches: int = 8,
                          percentile: float = 0.9999, task: Task | None = None) -> None:
    """Set each ActQuant's scale from the inputs it sees (a high percentile of |x|) and its sign.

    Example:
        >>> # calibrate_activations(qmodel, Batches(splits.train, 256), max_batches=8)
    """
    quants = [m for m in model.modules() if isinstance(m, ActQuant) and m.bits < FLOAT_BITS]
    saved_bits = {q: q.bits for q in quants}
    for q in quants:
        q.bits = FLOAT_BITS  # observe float activations
    try:
        ranges = input_ranges(model, quants, batches, max_batches, percentile, task)
    finally:
        for q in quants:
            q.bits = saved_bits[q]
    for q, (amax, signed) in ranges.items():
        levels = 2 ** (q.bits - 1) - 1 if signed else 2**q.bits - 1
        q.scale.fill_(amax / levels)
        q.signed.fill_(signed)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int = 50,
                          task: Task | None = None) -> None:
    """Re-estimate BatchNorm running statistics (they go stale once channels are removed or quantized)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or max_batches <= 0:
        return
    was_training, device = model.training, model_device(model)
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    model.train()
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            run_on(model, batch, device, task)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        model.train(was_training)
