"""Group Fisher importance (seed 001): squared gradient of the loss w.r.t. a mask on each channel.

A mask m (all ones) multiplies the output of every layer of a coupled group (after its BatchNorm); one mask
variable per group, so the gradient already sums the coupled copies before it is squared:

    importance_i = Σ_n (∂L_n/∂m_i)²        (n over samples)

Optionally divided by what removing the channel saves — the activation memory of the group's layers (the paper's
choice: it tracks GPU speed-up) or their MACs — so cheap-to-keep channels are not removed first.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from zerobit.data.loaders import batches_of
from zerobit.device import model_device
from zerobit.graph import ModelGraph
from zerobit.task import Task, get_task

NORMALIZERS = (None, "memory", "macs")


def fisher_scores(model: nn.Module, graph: ModelGraph, data: Iterable, batches: int = 8,
                  batch_size: int = 64, task: Task | None = None) -> dict[str, torch.Tensor]:
    """Σ over samples of the squared per-sample gradient w.r.t. each group's channel mask (unnormalized).

    The loss is the task's `fisher_loss` (cross-entropy against the labels for classification; for label-free
    distillation, see `Distillation.fisher_loss`). A conv's channels are dimension 1 of its output, a Linear's
    the last one (so a Linear on (B, T, C) tokens is masked per channel across every position).
    """
    task = get_task(task)
    model = copy.deepcopy(model).eval()  # eval: BatchNorm uses running statistics, as at inference
    masks: dict[str, torch.Tensor] = {}
    handles = []
    for gname, group in graph.groups.items():
        for lname in group.layers:
            layer = graph.layers[lname]
            if layer.kind == "embedding":  # its channels are token rows: no output to mask (never pruned)
                continue
            module = model.get_submodule(layer.bn or lname)

            def hook(_m: nn.Module, _i: object, out: torch.Tensor, gname: str = gname,
                     last: bool = layer.kind == "linear") -> torch.Tensor:
                m = masks[gname]  # (B, C)
                ones = [1] * (out.dim() - 2)
                return out * (m.view(m.shape[0], *ones, m.shape[1]) if last else m.view(*m.shape, *ones))

            handles.append(module.register_forward_hook(hook))
    device = model_device(model)
    totals = {g: torch.zeros(grp.channels, device=device) for g, grp in graph.groups.items()}
    try:
        for i, batch in enumerate(batches_of(data, batch_size, shuffle=True, seed=0)):
            if i >= batches:
                break
            batch = task.to_device(batch, device)
            n = task.batch_size(batch)
            for g, grp in graph.groups.items():
                masks[g] = torch.ones(n, grp.channels, requires_grad=True, device=device)  # per sample
            loss = task.fisher_loss(task.forward(model, batch).float(), batch)
            grads = torch.autograd.grad(loss, [masks[g] for g in graph.groups])
            for g, grad in zip(graph.groups, grads, strict=True):
                totals[g] += grad.pow(2).sum(dim=0)
    finally:
        for h in handles:
            h.remove()
    return totals


@dataclass
class Fisher:
    """Group Fisher criterion: a callable (model, graph, group) → one score per channel.

    Scores for all groups are computed in one pass over `batches` minibatches of `data` and cached per model.

    Example:
        >>> # scores = group_scores(model, graph, Fisher(splits.train, normalize="memory"))
    """

    data: Iterable
    batches: int = 8
    normalize: str | None = "memory"
    task: Task | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be one of {NORMALIZERS}, got {self.normalize!r}")

    def __call__(self, model: nn.Module, graph: ModelGraph, group: str) -> torch.Tensor:
        key = id(model)
        if key not in self._cache:
            self._cache = {key: fisher_scores(model, graph, self.data, self.batches, task=self.task)}
        scores = self._cache[key][group]
        return scores / self.saving(graph, group)

    def saving(self, graph: ModelGraph, group: str) -> float:
        """What removing one channel of `group` saves, in the chosen unit (1 if not normalized)."""
        layers = [graph.layers[n] for n in graph.groups[group].layers]
        if self.normalize == "memory":
            return float(max(1, sum(layer.out_area for layer in layers)))
        if self.normalize == "macs":
            return float(max(1.0, sum(layer.macs / layer.out_channels for layer in layers)))
        return 1.0
