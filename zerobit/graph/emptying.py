"""Groups that can lose every channel: a residual branch (or a transformer's MLP) removed whole.

When every channel of a group goes, the layers that produce it compute nothing, and a layer that reads only
that group outputs its bias alone: a constant per output channel. Where that layer's output is added to another
path (a residual block: ``out = bn2(conv2(relu(bn1(conv1(x))))) + x``), the block becomes ``x + constant`` and
its convolutions disappear from the model, the file and the runtime — depth pruning as the 0-bit end of the
same per-channel decision. The producers become `Emptied` (a tensor of 0 channels, of the right shape), the
readers `Constant` (their bias with their BatchNorm folded in: the only numbers of the branch left).

A group may be emptied (`ChannelGroup.empties`) when its readers read nothing else and removing it was checked
on the model itself: the emptied model runs, equals the model whose readers get all-zero weights, and its
output still depends on its input (emptying a chain with no way around it would make the model a constant).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zerobit.task import call, main_output, map_tensors

if TYPE_CHECKING:
    from zerobit.graph.analysis import ChannelGroup, ExtraTensor, Layer


class _Geometry:
    """Kernel, stride, padding and dilation of a Conv2d, for the spatial size of its output (a Linear's output
    keeps its input's leading dimensions)."""

    def __init__(self, layer: nn.Module) -> None:
        conv = isinstance(layer, nn.Conv2d)
        self.conv = conv
        if conv:
            self.kernel, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
            self.padding = layer.padding

    def side(self, size: int, dim: int) -> int:
        """Output length along spatial dim `dim` (0 = height) for an input of length `size`."""
        if self.padding == "same":
            return size
        pad = 0 if self.padding == "valid" else self.padding[dim]
        return (size + 2 * pad - self.dilation[dim] * (self.kernel[dim] - 1) - 1) // self.stride[dim] + 1

    def shape(self, x: torch.Tensor, channels: int) -> tuple[int, ...]:
        """The output shape for input `x` with `channels` output channels."""
        if not self.conv:
            return (*x.shape[:-1], channels)
        return (x.shape[0], channels, self.side(x.shape[2], 0), self.side(x.shape[3], 1))


class Emptied(nn.Module):
    """A Conv2d/Linear whose every output channel is removed: a tensor of 0 channels, shaped as its output."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.geometry = _Geometry(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(self.geometry.shape(x, 0))


class Constant(nn.Module):
    """A Conv2d/Linear whose every input channel is removed: its bias (BatchNorm folded in) at every position."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None) -> None:
        super().__init__()
        rows = layer.weight.shape[0]
        value = layer.bias.detach().clone() if layer.bias is not None else layer.weight.new_zeros(rows)
        if bn is not None:  # an eval-mode BatchNorm of a constant is a constant
            value = (value - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine:
                value = value * bn.weight + bn.bias
        self.value = nn.Parameter(value.detach().float().contiguous())
        self.geometry = _Geometry(layer)

    @property
    def out_channels(self) -> int:
        return self.value.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self.value.view((1, -1, 1, 1) if self.geometry.conv else (-1,))
        return view.expand(self.geometry.shape(x, self.value.numel())).contiguous()


def emptied_layers(layers: Mapping[str, Layer], kept: Mapping[str, int]) -> tuple[set[str], set[str]]:
    """(producers, readers): the layers of the groups `kept` (group → kept channels) leaves with none, and the
    layers that read only such groups."""
    empty = {g for g, k in kept.items() if k == 0}
    if not empty:
        return set(), set()
    producers = {n for n, lay in layers.items() if lay.out_group in empty}
    readers = {n for n, lay in layers.items() if n not in producers and lay.in_sources and lay.fixed_in == 0
               and all(g in empty for g, _ in lay.in_sources)}
    return producers, readers


def empty_groups(model: nn.Module, layers: Mapping[str, Layer], names: list[str]) -> None:
    """In place: the layers of groups `names` become `Emptied`, the layers reading them `Constant`, and the
    BatchNorms folded into either become Identity."""
    from zerobit.quant.apply import set_module  # zerobit.quant imports zerobit.graph

    producers, readers = emptied_layers(layers, dict.fromkeys(names, 0))
    for name in sorted(producers | readers):
        layer, module = layers[name], model.get_submodule(name)
        bn = model.get_submodule(layer.bn) if layer.bn else None
        set_module(model, name, Constant(module, bn) if name in readers else Emptied(module))
        if bn is not None:
            set_module(model, layer.bn, nn.Identity())


def _candidate(name: str, group: ChannelGroup, layers: Mapping[str, Layer], shortened: set[str]) -> bool:
    """Whether group `name` has the form an emptied group needs: plain layers, readers that read it alone."""
    if (not group.prunable or group.tie > 1 or group.span > 1 or group.readers or group.kv_heads
            or name in shortened):
        return False
    if any(layers[n].kind == "embedding" or layers[n].shares for n in group.layers):
        return False
    readers = [n for n, lay in layers.items() if n not in group.layers and any(g == name for g, _ in lay.in_sources)]
    return bool(readers) and all(
        len(layers[n].in_sources) == 1 and layers[n].fixed_in == 0 and layers[n].kind in ("conv", "linear")
        and layers[n].groups == 1 and not layers[n].shares for n in readers)


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return main_output(call(model, inputs)).detach().float()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 + 1e-4 * float(b.abs().max())))


def _perturbed(example_inputs: Any) -> Any:
    """The example changed: noise added to its float tensors, the order of its integer ones (token ids) reversed."""
    gen = torch.Generator().manual_seed(0)

    def change(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t + torch.randn(t.shape, generator=gen).to(t) * (float(t.std()) if t.numel() > 1 else 1.0) + 0.5
        return t.flip(-1) if t.dim() > 1 else t

    return map_tensors(example_inputs, change)


def _empties_exactly(model: nn.Module, inputs: tuple[Any, Any], outputs: tuple[torch.Tensor, torch.Tensor] | None,
                     layers: Mapping[str, Layer], name: str) -> bool:
    """Emptying group `name` of `model` runs, computes on `inputs[0]` what all-zero weights in its readers compute,
    and leaves outputs that still depend on the input: they differ on `inputs` (the example and a changed one)
    where the model's own `outputs` differ (None: the change did not move them, nothing to compare). `model` is
    restored before returning."""
    producers, readers = emptied_layers(layers, {name: 0})
    touched = sorted(producers | readers | {layers[n].bn for n in producers | readers if layers[n].bn})
    saved = {n: model.get_submodule(n) for n in touched}
    weights = {n: saved[n].weight.detach().clone() for n in readers}
    try:
        with torch.no_grad():
            for n in readers:
                saved[n].weight.zero_()
        want = _output(model, inputs[0])
    except Exception:  # noqa: BLE001 - a model that cannot run with these readers at zero: the group stays
        return False
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                saved[n].weight.copy_(w)
    from zerobit.quant.apply import set_module  # zerobit.quant imports zerobit.graph

    try:
        empty_groups(model, layers, [name])
        got = _output(model, inputs[0])
        moved = outputs is None or not _close(_output(model, inputs[1]), got)
    except Exception:  # noqa: BLE001 - model code that cannot run without these channels: they stay
        return False
    finally:
        for n in touched:
            set_module(model, n, saved[n])
    return moved and _close(got, want)


def find_emptiable(model: nn.Module, example_inputs: Any, layers: Mapping[str, Layer],
                   groups: Mapping[str, ChannelGroup], extra: Mapping[str, ExtraTensor]) -> None:
    """Mark the groups whose every channel can go (`ChannelGroup.empties`), each checked on `model` itself."""
    shortened = {g for t in extra.values() for _, g, _ in t.pruned_dims}
    candidates = [n for n, g in groups.items() if _candidate(n, g, layers, shortened)]
    if not candidates:
        return
    inputs = (example_inputs, _perturbed(example_inputs))
    try:
        outputs = (_output(model, inputs[0]), _output(model, inputs[1]))
        informative = outputs if not _close(*outputs) else None
    except Exception:  # noqa: BLE001 - a model that refuses the changed input: nothing to compare
        informative = None
    for name in candidates:
        groups[name].empties = _empties_exactly(model, inputs, informative, layers, name)


def name_list(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Names given as a tuple, or as one comma-separated string (a command-line option)."""
    if isinstance(names, str):
        return tuple(n.strip() for n in names.split(",") if n.strip())
    return tuple(names)


def groups_to_empty(groups: Mapping[str, ChannelGroup], names: list[str] | tuple[str, ...]) -> list[str]:
    """The groups `names` asks to remove whole: a name is a group, or a module (a block, a stage) whose
    removable groups all go. Raises ValueError naming what cannot go."""
    chosen: list[str] = []
    for name in names:
        inside = [g for g, grp in groups.items() if g == name or any(n.startswith(f"{name}.") for n in grp.layers)]
        if not inside:
            raise ValueError(f"{name!r} is neither a channel group nor a module holding one; groups that can be "
                             f"removed whole: {[g for g, grp in groups.items() if grp.empties]}")
        if name in groups and not groups[name].empties:
            raise ValueError(f"group {name!r} cannot be removed whole: only a group whose readers read nothing "
                             "else and whose model still depends on its input without it (a residual branch, a "
                             "transformer's MLP) can; ModelGraph.summary() lists them")
        found = [g for g in inside if groups[g].empties]
        if not found:
            raise ValueError(f"module {name!r} holds no group that can be removed whole (a residual branch, a "
                             "transformer's MLP); ModelGraph.summary() lists them")
        chosen += [g for g in found if g not in chosen]
    return chosen
