"""Fused q/k/v projections (GPT-2's `c_attn`) as three Linears, so their heads are removed like separate q, k, v.

GPT-2 computes queries, keys and values with one projection of 3 × width outputs and splits it in thirds
(`split_size` = width): a head's rows are three slices of one weight, and Torch-Pruning cannot follow one channel
through that split. zerobit works on a copy of such a model in which the projection is a `FusedLinear`: three
nn.Linear (`q`, `k`, `v`, the thirds of the weight and bias) whose outputs are concatenated — the same outputs, but
three layers that couple head by head through the attention like BERT's. After heads are removed, the attention
module's head count and `split_size` are set to what is left (zerobit.graph.heads).

Taken for one: an nn.Linear whose parent module has a head count H ≥ 2 and a head size d (see
zerobit.graph.heads), `split_size` = H·d, and 3·H·d output features. Files written before version 5 hold the fused
projection as one layer (its heads kept); `load` reads them so.

Example:
    >>> class Attn(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.num_heads, self.head_dim, self.split_size = 2, 4, 8
    ...         self.c_attn = nn.Linear(8, 24)
    >>> m = split_fused_(nn.Sequential(Attn()))
    >>> type(m[0].c_attn).__name__, tuple(m[0].c_attn.v.weight.shape)
    ('FusedLinear', (8, 8))
"""

from __future__ import annotations

import torch
from torch import nn

from zerobit.graph.heads import HEAD_COUNT_ATTRS, HEAD_SIZE_ATTRS, int_attr
from zerobit.graph.surgery import remove_rows

PARTS = ("q", "k", "v")


class FusedLinear(nn.Module):
    """One projection computed as three Linears whose outputs are concatenated (y = [q(x), k(x), v(x)])."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.q, self.k, self.v = q, k, v

    @property
    def in_features(self) -> int:
        return self.q.in_features

    @property
    def out_features(self) -> int:
        return self.q.out_features + self.k.out_features + self.v.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def is_fused_qkv(module: nn.Module, parent: nn.Module) -> bool:
    """True for an nn.Linear that `parent` (an attention module) splits into q, k and v thirds of its heads."""
    if type(module) is not nn.Linear:
        return False
    count, size = int_attr(parent, HEAD_COUNT_ATTRS), int_attr(parent, HEAD_SIZE_ATTRS)
    width = getattr(parent, "split_size", None)
    return (count is not None and size is not None and count[1] >= 2 and isinstance(width, int)
            and width == count[1] * size[1] and module.out_features == len(PARTS) * width)


def _split(linear: nn.Linear) -> FusedLinear:
    width = linear.out_features // len(PARTS)
    parts = []
    for i in range(len(PARTS)):
        part = nn.Linear(linear.in_features, width, bias=linear.bias is not None, device=linear.weight.device,
                         dtype=linear.weight.dtype)
        with torch.no_grad():
            part.weight.copy_(linear.weight[i * width:(i + 1) * width])
            if linear.bias is not None:
                part.bias.copy_(linear.bias[i * width:(i + 1) * width])
        parts.append(part)
    fused = FusedLinear(*parts)
    fused.train(linear.training)
    return fused


def fused_projections(model: nn.Module) -> list[str]:
    """Names of the fused q/k/v projections of `model`."""
    return [f"{parent_name}.{attr}" if parent_name else attr
            for parent_name, parent in model.named_modules()
            for attr, child in parent.named_children() if is_fused_qkv(child, parent)]


def split_fused_(model: nn.Module) -> nn.Module:
    """Swap every fused q/k/v projection of `model` for an equal FusedLinear, in place; returns `model`."""
    for name in fused_projections(model):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, _split(getattr(owner, attr)))
    return model


def part_names(model: nn.Module) -> list[list[str]]:
    """For each FusedLinear of `model`, the names of its q, k and v layers."""
    return [[f"{name}.{p}" for p in PARTS] for name, m in model.named_modules() if isinstance(m, FusedLinear)]


def merge_fused_groups(model: nn.Module, layers: dict, groups: dict) -> None:
    """One channel group per fused projection: its q, k and v rows of one channel are one decision (the same head
    position in the three thirds), in the group of q. Torch-Pruning's walk from each part reaches the attention's
    output projection but not the other parts; their inputs' groups are merged here, and `remove_channels` removes
    the other parts' rows. Left as they are (three groups) unless each part is alone in a group of one width."""
    for parts in part_names(model):
        own = [groups.get(layers[p].out_group) if p in layers else None for p in parts]
        if any(g is None or g.layers != [p] for g, p in zip(own, parts, strict=True)) or \
                len({g.channels for g in own}) != 1:
            continue
        first, rest = own[0], own[1:]
        first.layers = list(parts)
        first.prunable = all(g.prunable for g in own)
        for g in rest:
            layers[g.name].out_group = first.name
            del groups[g.name]
        gone = {g.name for g in rest}
        for layer in layers.values():
            sources = [(first.name if g in gone else g, per) for g, per in layer.in_sources]
            layer.in_sources = list(dict.fromkeys(sources))


def remove_fused_rows(model: nn.Module, group_layers: list[str], idxs: list[int], before: dict[str, int]) -> None:
    """Remove rows `idxs` of the fused q/k/v parts in `group_layers` that a Torch-Pruning walk left at their width
    `before` (see merge_fused_groups)."""
    for name in group_layers:
        module = model.get_submodule(name)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        if isinstance(parent, FusedLinear) and module.out_features == before[name]:
            remove_rows(module, idxs)


def rejoined(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (of `model`) with each FusedLinear's q, k and v tensors joined into the one the original
    projection holds, so sizes taken from it are the original model's."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            for kind in ("weight", "bias"):
                keys = [f"{name}.{p}.{kind}" for p in PARTS]
                if all(k in state for k in keys):
                    state[f"{name}.{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state
