"""Tied weights: layers that use one weight tensor (GPT-2's and BERT's output layer and token embedding).

A language model commonly ties its output projection to its token embedding: `lm_head.weight is
wte.weight`, a (vocab, hidden) table that is the largest tensor of a small model. zerobit keeps such a tensor one
tensor everywhere. The later layer (in module order) `shares` the earlier one's weight: both join one channel
group, so every row has one bit-width (the table's rows are the output channels of both layers), the fake-quant
model quantizes the weight once and both layers use it, the .zbit file stores its codes and scales once (the
sharing layer stores only its own bias), and `load` returns a model whose two layers hold one Parameter again,
as the original did. The fp32 reference size counts the tensor once too (`fp32_file_bytes`).

Layers are tied only where it is exact: one Parameter object of one shape, no BatchNorm folded into either, and
neither in a group with tied blocks or heads. Such a group keeps every channel (a token's row is never removed),
and where the two layers read inputs of different groups, those groups keep theirs (a column of the shared
weight cannot be removed for one layer only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from zerobit.graph.analysis import ChannelGroup, Layer


def share_tied_weights(model: nn.Module, layers: dict[str, Layer], groups: dict[str, ChannelGroup]) -> None:
    """Mark every layer whose weight is an earlier layer's (`Layer.shares`) and merge its group into that layer's
    group (in place)."""
    first: dict[int, str] = {}
    for name, layer in layers.items():
        weight = model.get_submodule(name).weight
        owner = first.setdefault(id(weight), name)
        if owner == name:
            continue
        mine, theirs = groups[layer.out_group], groups[layers[owner].out_group]
        if layer.bn or layers[owner].bn or mine is theirs or mine.layers != [name] or \
                mine.channels != theirs.channels or max(mine.tie, mine.span, theirs.tie, theirs.span) > 1:
            continue
        del groups[mine.name]
        theirs.layers.append(name)
        theirs.prunable = False
        layer.out_group, layer.shares = theirs.name, owner
        if sorted(layer.in_sources) != sorted(layers[owner].in_sources):  # inputs from different groups:
            for group, _per in layer.in_sources + layers[owner].in_sources:  # columns of one weight removed
                groups[group].prunable = False                               # for both, or for neither
        for other in layers.values():  # what read the sharing layer's channels reads the merged group's
            other.in_sources = [(theirs.name if g == mine.name else g, per) for g, per in other.in_sources]


def retie(model: nn.Module, layers: dict[str, Layer]) -> None:
    """Make every sharing layer of `model` use its owner's weight Parameter again (pruning with Torch-Pruning
    gives each module its own pruned copy); refuses copies that no longer agree."""
    for name, layer in layers.items():
        if layer.shares:
            mine, theirs = model.get_submodule(name), model.get_submodule(layer.shares)
            if mine.weight.shape != theirs.weight.shape or not bool((mine.weight == theirs.weight).all()):
                raise RuntimeError(f"layer {name!r} shares the weight of {layer.shares!r}, but pruning left them "
                                   "different; report the model to zerobit's issue tracker")
            mine.weight = theirs.weight
