"""Removing rows (output features) or columns (input features) of an nn.Linear in place: for the couplings zerobit
follows itself, where Torch-Pruning's walk does not reach (zerobit.graph.fused, zerobit.graph.rotary)."""

from __future__ import annotations

import torch
from torch import nn


def _keep(size: int, idxs: list[int]) -> torch.Tensor:
    gone = set(idxs)
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def remove_rows(linear: nn.Linear, idxs: list[int]) -> None:
    """Drop output features `idxs` (weight rows and bias entries)."""
    keep = _keep(linear.out_features, idxs).to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data[keep].clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[keep].clone(), linear.bias.requires_grad)
    linear.out_features = len(keep)


def remove_columns(linear: nn.Linear, idxs: list[int]) -> None:
    """Drop input features `idxs` (weight columns)."""
    keep = _keep(linear.in_features, idxs).to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data[:, keep].clone(), linear.weight.requires_grad)
    linear.in_features = len(keep)
