"""Magnitude importance: how large a channel's effective (BatchNorm-scaled) weights are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zerobit.device import model_device
from zerobit.graph import ModelGraph


@dataclass(frozen=True)
class Magnitude:
    """Score of channel c = Σ over the group's layers of mean |w_c|^p · |γ_c/σ_c| (BatchNorm folded in).

    Normalizing by the weights per channel keeps layers of different sizes comparable within a group.

    Example:
        >>> # scores = Magnitude(p=1)(model, graph, "layer1.0.conv1")   # one score per channel
    """

    p: int = 1

    def __call__(self, model: nn.Module, graph: ModelGraph, group: str) -> torch.Tensor:
        total = torch.zeros(graph.groups[group].channels, device=model_device(model))
        for name in graph.groups[group].layers:
            layer = graph.layers[name]
            w = model.get_submodule(name).weight.detach().flatten(1).abs()
            score = w.pow(self.p).mean(dim=1).pow(1.0 / self.p)
            if layer.bn:
                bn = model.get_submodule(layer.bn)
                score = score * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps))
            total += score
        return total


def group_scores(model: nn.Module, graph: ModelGraph, criterion=None) -> dict[str, torch.Tensor]:
    """One score per channel for every group (default criterion: L1 magnitude), on the CPU wherever the model is."""
    criterion = criterion or Magnitude()
    return {name: criterion(model, graph, name).float().cpu() for name in graph.groups}
