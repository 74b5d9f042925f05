"""Which dimensions of the tensors outside the layers each group's channels shorten, and removing a group's
channels from a model (Torch-Pruning's walk, or zerobit's own rows and columns where it couples them itself)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from zerobit.graph.fused import remove_fused_rows
from zerobit.graph.heads import update_head_counts
from zerobit.graph.surgery import remove_columns, remove_rows
from zerobit.graph.tp_compat import pruning_group
from zerobit.task import call

if TYPE_CHECKING:
    from zerobit.graph.analysis import ChannelGroup, ExtraTensor


def find_pruned_dims(model: nn.Module, example_inputs: Any, groups: dict[str, ChannelGroup],
                      extra: dict[str, ExtraTensor]) -> None:
    """Which dimensions of the extra tensors each group's channels shorten, found by removing one channel.

    Pruning is done by Torch-Pruning exactly as `prune_structure` does it, group after group on one copy, so
    the sizes the file estimate uses are the sizes the pruned model has. After each group the copy is run: a
    group whose removal the model's own code does not follow (a reshape to fixed sizes, such as Swin's patch
    merging or ``x.view(B, 16, -1)``) keeps every channel (it is only quantized), and the copy is pruned again
    without it. (Torch-Pruning builds its graph of a ResNet-20 in ~20 ms; one forward per group follows.)
    """
    done: list[str] = []
    probe, dg = _pruned_copy(model, example_inputs, groups, done)
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items() if k in extra}
    for name, group in groups.items():
        if not group.prunable or group.block < 2:
            continue
        if not _removes_and_runs(probe, dg, groups, name, example_inputs):
            group.prunable = False
            probe, dg = _pruned_copy(model, example_inputs, groups, done)
            continue
        done.append(name)
        now = {k: tuple(v.shape) for k, v in probe.state_dict().items() if k in extra}
        removed = sum(1 for c in range(group.channels) if group.decision_index(c) == 0)
        for key, shape in now.items():
            for dim, (before, after) in enumerate(zip(shapes[key], shape, strict=True)):
                if after != before:
                    extra[key].pruned_dims.append((dim, name, (before - after) // removed))
        shapes = now


def _remove_decision_0(probe: nn.Module, dg: tp.DependencyGraph, groups: dict[str, ChannelGroup],
                       name: str) -> None:
    """Remove the channels decision 0 of group `name` covers, and update the head counts it changes."""
    group = groups[name]
    remove_channels(probe, dg, group, [c for c in range(group.channels) if group.decision_index(c) == 0])
    if group.span > 1:
        update_head_counts(probe, {layer: group for layer in group.layers})


def remove_channels(model: nn.Module, dg: tp.DependencyGraph, group: ChannelGroup, idxs: list[int]) -> None:
    """Remove channels `idxs` of `group` from `model`: Torch-Pruning's walk from the group's first layer, then the
    rows of fused q/k/v parts the walk does not reach (zerobit.graph.fused); or, for a group zerobit couples
    itself, its layers' rows and its readers' columns (zerobit.graph.rotary)."""
    if group.readers:
        for name in group.layers:
            remove_rows(model.get_submodule(name), idxs)
        for name in group.readers:
            remove_columns(model.get_submodule(name), idxs)
        return
    before = {n: model.get_submodule(n).weight.shape[0] for n in group.layers}
    pruning_group(dg, model.get_submodule(group.name), idxs).prune()
    remove_fused_rows(model, group.layers, idxs, before)


def _pruned_copy(model: nn.Module, example_inputs: Any, groups: dict[str, ChannelGroup],
                 names: list[str]) -> tuple[nn.Module, tp.DependencyGraph]:
    """A copy of `model` with decision 0 of each group in `names` removed, and its dependency graph."""
    from zerobit.graph.analysis import build_dependency_graph  # analysis imports this module

    probe = copy.deepcopy(model)
    dg = build_dependency_graph(probe, example_inputs)
    for name in names:
        _remove_decision_0(probe, dg, groups, name)
    return probe, dg


def _removes_and_runs(probe: nn.Module, dg: tp.DependencyGraph, groups: dict[str, ChannelGroup], name: str,
                      example_inputs: Any) -> bool:
    """Remove decision 0 of group `name` from `probe`; does the model's code still run?"""
    try:
        _remove_decision_0(probe, dg, groups, name)
        with torch.no_grad():
            call(probe, example_inputs)
    except Exception:  # any failure of Torch-Pruning or of the model's own code on the pruned widths
        return False
    return True
