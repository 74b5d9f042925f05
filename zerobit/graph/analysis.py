"""Trace a model into quantizable layers, coupled channel groups and per-layer statistics.

Coupling comes from Torch-Pruning's DependencyGraph: every Conv/Linear whose output channels must be removed
together (residual adds, depthwise convs, concatenation feeding one consumer) lands in one `ChannelGroup`. A
group is named after its first layer in module order. The output layer's group is kept but marked
non-prunable: its channels can get fewer bits, never 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from zerobit.graph.emptying import find_emptiable
from zerobit.graph.fused import merge_fused_groups, rejoined
from zerobit.graph.heads import head_size
from zerobit.graph.linears import linearize_
from zerobit.graph.mha import rejoin_attention
from zerobit.graph.removal import find_pruned_dims
from zerobit.graph.rotary import merge_rotary_heads
from zerobit.graph.tied import share_tied_weights
from zerobit.graph.tp_compat import CouplingLoopError, pruning_group
from zerobit.task import call, first_tensor, main_output, map_tensors

QUANT_TYPES = (nn.Conv2d, nn.Linear, nn.Embedding)


class UntraceableModelError(ValueError):
    """The model could not be traced into layers and coupled channel groups."""


@dataclass
class Layer:
    """One Conv2d/Linear/Embedding whose weights are quantized.

    An Embedding table (V, D) is a layer of V output channels (one per row: bits and a scale per token) whose
    D input features follow the group of the residual stream it feeds; it runs no multiply-accumulates.

    `in_sources` lists (group name, input features per group channel); `fixed_in` counts the input features no
    group controls (e.g. the image channels of the first conv).
    """

    name: str
    kind: str  # "conv" | "depthwise" | "linear" | "embedding"
    in_features: int
    out_channels: int
    kernel_area: int
    groups: int
    out_area: int  # positions the layer runs at per sample: H*W of a conv, T (or H*W) of a Linear on (B, T, C)
    out_group: str = ""
    in_sources: list[tuple[str, int]] = field(default_factory=list)
    fixed_in: int = 0
    bn: str | None = None  # name of the BatchNorm2d folded into this layer
    has_bias: bool = False
    stride: int = 1
    shares: str | None = None  # the earlier layer whose weight this one uses (tied weights; see graph.tied)

    @property
    def weights_per_channel(self) -> int:
        """Weights in one output channel of the unpruned layer."""
        return self.in_features // self.groups * self.kernel_area

    @property
    def params(self) -> int:
        return self.weights_per_channel * self.out_channels

    @property
    def macs(self) -> int:
        return self.params * self.out_area


@dataclass
class ChannelGroup:
    """Output channels of several layers that must share one decision per channel.

    `tie` > 1 (next to a grouped convolution of `tie` groups): the channels form `tie` equal blocks, and channel i
    of every block shares one decision, so each conv group loses the same channels. Decisions are then made on
    the `block` first channels (scores summed over the tied copies) and repeated.

    `span` > 1 (attention heads: the q/k/v rows of one head): every `span` consecutive channels share one
    decision, so a head is kept or removed, and quantized, as a whole.

    `readers`: layers whose input columns follow the group where zerobit removes the channels itself, rows of
    `layers` and columns of `readers` (zerobit.graph.rotary); empty: Torch-Pruning's walk removes them.

    `kv_heads` > 0: the group is the q heads of attention with that many grouped k/v heads, which stay whole;
    `tie` = `kv_heads`, so each k/v head keeps as many q heads (zerobit.graph.rotary).

    `empties`: every channel may go (a residual branch or an MLP removed whole: its readers then output a
    constant; zerobit.graph.emptying). Otherwise a policy keeps at least one.
    """

    name: str
    channels: int
    layers: list[str]
    prunable: bool = True
    tie: int = 1
    span: int = 1
    readers: list[str] = field(default_factory=list)
    kv_heads: int = 0
    empties: bool = False

    @property
    def block(self) -> int:
        """Decisions the group carries (the tied copies and the channels of a span repeat them)."""
        return self.channels // self.tie // self.span

    def decision_index(self, channel: int) -> int:
        """Which of the `block` decisions channel `channel` follows."""
        return channel % (self.channels // self.tie) // self.span


@dataclass
class ExtraTensor:
    """A state-dict entry outside the quantized layers (LayerNorm, layer-scale, positional tensors, …).

    `pruned_dims` lists (dim, group, per): removing one channel of `group` shortens dimension `dim` by `per`.
    The file stores it pruned, so its size follows the policy.
    """

    shape: tuple[int, ...]
    pruned_dims: list[tuple[int, str, int]] = field(default_factory=list)

    def numel(self, removed: dict[str, int] | None = None) -> int:
        """Elements left once `removed[group]` channels of each group are gone (None: unpruned)."""
        dims = list(self.shape)
        for dim, group, per in self.pruned_dims if removed else ():
            dims[dim] -= removed.get(group, 0) * per
        return math.prod(dims)


@dataclass
class ModelGraph:
    """Layers, coupled groups and sizes of one model, as traced on `example_inputs`."""

    layers: dict[str, Layer]
    groups: dict[str, ChannelGroup]
    fp32_bytes: int
    input_shape: tuple[int, ...]
    ignored: tuple[str, ...] = ()
    extra_params: dict[str, ExtraTensor] = field(default_factory=dict)  # state outside the quantized layers
    model_name: str = ""  # zoo name, lets a .zbit file rebuild the model by itself

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers.values())

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers.values())

    @property
    def weight_layers(self) -> list[str]:
        """Layers that hold their own weight: all but those that share an earlier layer's (tied weights)."""
        return [n for n, layer in self.layers.items() if not layer.shares]

    def summary(self) -> str:
        """A readable table of groups and the layers they couple (`head`: channels decided together, one
        attention head; `tie`: blocks next to a grouped conv; `whole`: the group can be removed whole, a residual
        branch or an MLP)."""
        lines = [f"{'group':28} {'ch':>4} {'prunable':>8} {'whole':>5} {'tie':>3} {'head':>4}  "
                 "layers (= shares the weight of)"]
        for g in self.groups.values():
            names = [n + (f" (= {self.layers[n].shares})" if self.layers[n].shares else "") for n in g.layers]
            lines.append(f"{g.name:28} {g.channels:>4} {str(g.prunable):>8} {'yes' if g.empties else '':>5} "
                         f"{g.tie:>3} {g.span:>4}  {', '.join(names)}")
        return "\n".join(lines)


def fp32_file_bytes(model: nn.Module) -> int:
    """Bytes of the model's float32 state_dict written as a safetensors file (the "fp32 file"); a tensor tied to
    another (GPT-2's lm_head and token embedding) is written once, a split q/k/v projection (zerobit.graph.fused)
    or nn.MultiheadAttention's (zerobit.graph.mha) as the one tensor the original holds."""
    from safetensors.torch import save

    state, seen = {}, set()
    for k, v in model.state_dict().items():
        where = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and where in seen:
            continue
        seen.add(where)
        state[k] = v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
    return len(save(rejoin_attention(model, rejoined(model, state))))


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's DependencyGraph of `model`, with a clear error when tracing fails."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False,
                                                     output_transform=main_output)
    except Exception as exc:  # torch-pruning raises many kinds; the user needs one message
        raise UntraceableModelError(
            f"zerobit could not trace the model ({type(exc).__name__}: {exc}). The model must run on "
            "`example_inputs` with standard nn.Conv2d/nn.Linear/nn.Embedding/nn.BatchNorm2d modules; "
            "data-dependent control flow and in-place ops on residual paths are not supported."
        ) from exc


def _output_areas(model: nn.Module, example_inputs: Any) -> tuple[dict[nn.Module, int], list[nn.Module]]:
    """Positions each layer runs at per sample, summed over its calls (a module used twice counts twice), and the
    layers whose outputs the model returns as they are (their storage is that of a returned tensor)."""
    areas: dict[nn.Module, int] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}  # held until the end, so no other tensor reuses their memory

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        outputs[module] = output
        per_sample = output[0] if output.dim() > 1 else output
        if isinstance(module, (nn.Linear, nn.Embedding)):  # (B, C), (B, T, C), (B, H, W, C): every position runs
            area = per_sample.numel() // max(1, output.shape[-1])
        else:  # (B, C, H, W)
            area = per_sample[0].numel()
        areas[module] = areas.get(module, 0) + int(area)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, QUANT_TYPES)]
    try:
        out = run_or_explain(model, example_inputs, "Pass an input the model accepts, e.g. one batch of your data.")
    finally:
        for h in handles:
            h.remove()
    returned: set[int] = set()
    map_tensors(_as_tree(out), lambda t: returned.add(t.untyped_storage().data_ptr()))
    return areas, [m for m, t in outputs.items() if t.untyped_storage().data_ptr() in returned]


def _as_tree(out: Any) -> Any:
    """A model's outputs as nested tuples/dicts of tensors (a ModelOutput becomes a dict)."""
    if hasattr(out, "keys") and not isinstance(out, dict):
        return {k: out[k] for k in out.keys()}
    return out


def run_or_explain(model: nn.Module, example_inputs: Any, fix: str) -> Any:
    """Run `model` once (no grad) and return its outputs; if it fails, raise UntraceableModelError naming the
    module that failed."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []  # modules entered and not yet left: the last one is where a failure happened

    def enter(module: nn.Module, _args: object) -> None:
        running.append(names[module] or "model")

    def leave(_module: nn.Module, _args: object, _out: object) -> None:
        running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter),
                                                     m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            return call(model, example_inputs)
    except Exception as exc:
        where = f" in module {running[-1]!r} ({type(model.get_submodule(running[-1])).__name__})" \
            if running and running[-1] != "model" else ""
        raise UntraceableModelError(f"the model fails on inputs of shape {input_shape(example_inputs)}{where}: "
                                    f"{type(exc).__name__}: {exc}. {fix}") from exc
    finally:
        for h in handles:
            h.remove()


def _make_layer(name: str, module: nn.Module, area: int) -> Layer:
    if isinstance(module, nn.Embedding):  # a lookup: no multiply-accumulates (out_area 0)
        return Layer(name, "embedding", module.embedding_dim, module.num_embeddings, 1, 1, 0)
    if isinstance(module, nn.Linear):
        return Layer(name, "linear", module.in_features, module.out_features, 1, 1, area,
                     has_bias=module.bias is not None)
    # depthwise: one input channel per output channel, so it shares its input's channel decisions; other grouped
    # convs are kind "conv" with groups > 1, whose input and output channels are tied (see _tie_or_freeze)
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    kind = "depthwise" if depthwise else "conv"
    kh, kw = module.kernel_size
    return Layer(name, kind, module.in_channels, module.out_channels, kh * kw, module.groups, area,
                 has_bias=module.bias is not None, stride=module.stride[0])


def _folded_bn(dg: tp.DependencyGraph, module: nn.Module) -> nn.Module | None:
    """The BatchNorm2d that directly and only consumes `module`'s output, if any."""
    node = dg.module2node.get(module)
    consumers = {out.module for out in node.outputs} if node is not None else set()
    if len(consumers) != 1:  # a module called twice lists its one consumer once per call
        return None
    nxt = consumers.pop()
    if isinstance(nxt, nn.BatchNorm2d) and isinstance(module, nn.Conv2d) and nxt.num_features == module.out_channels:
        return nxt
    return None


def _default_ignored(model: nn.Module, returned: list[nn.Module]) -> list[nn.Module]:
    """The output layers, whose widths the model's outputs have: those whose outputs the model returns as they
    are; when none does (an output computed after the last layer), the last Conv2d/Linear in module order."""
    if returned:
        return returned
    layers = [m for m in model.modules() if isinstance(m, QUANT_TYPES)]
    return layers[-1:]


def input_shape(example_inputs: Any) -> tuple[int, ...]:
    """The shape of the (first) input tensor."""
    return tuple(first_tensor(example_inputs).shape)


def analyse(model: nn.Module, example_inputs: Any, ignored_layers: list[str] | None = None,
            tied: bool = True, split: bool = True, attention: bool = True) -> ModelGraph:
    """Trace `model` into a `ModelGraph`.

    Args:
        model: a trained network made of standard modules.
        example_inputs: one input batch, e.g. ``torch.zeros(1, 1, 28, 28)``.
        ignored_layers: names of layers whose output channels are never pruned, besides the output layer
            (their groups are only quantized); a module that holds layers (a block, an attention) names them all.
        tied: layers that use one weight tensor share one group and are stored once (see zerobit.graph.tied);
            False traces them as separate layers, as .zbit files before version 4 hold them.
        split: fused q/k/v projections are traced as three layers (zerobit.graph.fused) and rotary attention
            heads are coupled by zerobit (zerobit.graph.rotary); False traces neither, as .zbit files before
            version 5 hold them.
        attention: nn.MultiheadAttention is traced as three Linears (zerobit.graph.mha) and the q heads of
            attention with grouped k/v heads are one group (zerobit.graph.rotary); False traces neither, as .zbit
            files before version 6 hold them.

    Example:
        >>> g = analyse(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
        ...             torch.zeros(1, 1, 8, 8))
        >>> list(g.groups)
        ['0', '2']
    """
    model = linearize_(copy.deepcopy(model), split, attention).eval()
    names = {m: n for n, m in model.named_modules()}
    areas, returned = _output_areas(model, example_inputs)
    ignored = _default_ignored(model, returned)
    if ignored_layers:
        by_name = dict(model.named_modules())
        missing = [n for n in ignored_layers if n not in by_name]
        if missing:
            raise ValueError(f"ignored_layers names {missing} are not modules of the model")
        named = [m for n in ignored_layers for m in by_name[n].modules()  # a block, an attention: its layers
                 if isinstance(m, QUANT_TYPES)]
        ignored += [m for m in named if m not in ignored]
    dg = build_dependency_graph(model, example_inputs)
    layers: dict[str, Layer] = {}
    for module in model.modules():
        if isinstance(module, QUANT_TYPES) and module in dg.module2node:
            name = names[module]
            layers[name] = _make_layer(name, module, areas.get(module, 1))
            bn = _folded_bn(dg, module)
            layers[name].bn = names[bn] if bn is not None else None
    groups = _coupled_groups(dg, model, names, layers, ignored, example_inputs if split else None, attention)
    _find_heads(model, groups)
    if tied:
        share_tied_weights(model, layers, groups)
    for layer in layers.values():
        coupled = sum(channels * per for g, per in layer.in_sources for channels in [groups[g].channels])
        layer.fixed_in = 0 if layer.kind == "depthwise" else layer.in_features - coupled
    owned = tuple(f"{n}." for layer in layers.values() for n in (layer.name, layer.bn) if n)
    extra = {k: ExtraTensor(tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith(owned)}
    find_pruned_dims(model, example_inputs, groups, extra)
    find_emptiable(model, example_inputs, layers, groups, extra)
    return ModelGraph(layers, groups, fp32_file_bytes(model), input_shape(example_inputs),
                      tuple(names[m] for m in ignored), extra)


def _coupled_groups(dg: tp.DependencyGraph, model: nn.Module, names: dict[nn.Module, str],
                    layers: dict[str, Layer], ignored: list[nn.Module], example_inputs: Any,
                    grouped: bool = True) -> dict[str, ChannelGroup]:
    groups: dict[str, ChannelGroup] = {}
    unwalked: set[str] = set()  # layers whose walk failed: rotary attention's q/k/v, where it never ends
    for module in model.modules():
        name = names.get(module)
        if name not in layers or layers[name].out_group:
            continue
        channels = layers[name].out_channels
        if layers[name].kind == "embedding":  # its rows (tokens) are never removed; only quantized
            _kept_whole(layers, groups, name)
            continue
        try:
            group = pruning_group(dg, module, list(range(channels)))
        except Exception as exc:  # noqa: BLE001 - any failure of the walk leaves the layer whole, never the run
            # a walk that does not end (q/k projections feeding rotary embeddings: quantized, unless
            # merge_rotary_heads finds whole heads), or one Torch-Pruning cannot map (GPT-NeoX's interleaved q/k/v
            # split: IndexError; repeat_interleave of k/v heads in hand-written LLaMA code: ZeroDivisionError):
            # the layer keeps every channel
            _kept_whole(layers, groups, name)
            if grouped or isinstance(exc, CouplingLoopError):  # files before version 6: only walks that never end
                unwalked.add(name)
            continue
        members, prunable = _members(dg, group, name, channels, names, layers, ignored, module not in ignored)
        if name not in members:  # the walk does not map the layer's own channels one for one (GPT-J's q_proj)
            members, prunable = [name, *members], False
            layers[name].out_group = name
        groups[name] = ChannelGroup(name, channels, members, prunable)
    merge_fused_groups(model, layers, groups)
    if example_inputs is not None:  # None: as files before version 5 were traced
        merge_rotary_heads(model, names, layers, groups, unwalked, ignored, example_inputs, grouped)
    _tie_or_freeze(layers, groups)
    return groups


def _members(dg: tp.DependencyGraph, group, name: str, channels: int, names: dict[nn.Module, str],
             layers: dict[str, Layer], ignored: list[nn.Module], prunable: bool) -> tuple[list[str], bool]:
    """The layers whose output channels follow layer `name`'s in Torch-Pruning's `group`, and whether the group
    stays prunable; records on each layer that reads the group how (`Layer.in_sources`)."""
    members = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        target = dep.target.module
        tname = names.get(target)
        if tname not in layers:
            continue
        layer = layers[tname]
        if layer.kind == "embedding":  # the group shortens the embedding's rows: an input of the table
            prunable = _reads(layer, name, idxs, channels) and prunable
        elif dg.is_out_channel_pruning_fn(dep.handler):
            if layer.out_channels != channels or layer.out_group not in ("", name) or \
                    list(item.root_idxs) != list(idxs):
                # coupling Torch-Pruning reports but channels cannot follow one for one (x * gate with a
                # 1-channel gate broadcast over x; a channel shuffle): both keep every channel, own groups
                prunable = False
                continue
            if tname not in members:
                members.append(tname)
                layer.out_group = name
            prunable = prunable and target not in ignored
            if layer.kind == "depthwise":
                layer.in_sources = [(name, 1)]
        elif layer.kind != "depthwise":
            prunable = _reads(layer, name, idxs, channels) and prunable
    return members, prunable


def _reads(layer: Layer, source: str, idxs, channels: int) -> bool:
    """Record that `layer` reads group `source` (`idxs`: a whole number of its inputs per channel); False where
    they do not map one for one, and the group then keeps every channel."""
    per, rest = divmod(len(idxs), channels)
    if rest or not per:
        return False
    if (source, per) not in layer.in_sources:
        layer.in_sources.append((source, per))
    return True


def _kept_whole(layers: dict[str, Layer], groups: dict[str, ChannelGroup], name: str) -> None:
    """`name` in a group of its own that keeps every channel (quantized only)."""
    layers[name].out_group = name
    groups[name] = ChannelGroup(name, layers[name].out_channels, [name], prunable=False)


def _tie_or_freeze(layers: dict[str, Layer], groups: dict[str, ChannelGroup]) -> None:
    """Tie the channels around grouped convs; keep every channel (quantize only) where removal is not exact.

    A grouped conv (other than depthwise) needs the same channels removed from each of its groups: its output
    group and its input group are tied (see ChannelGroup.tie). An input that is not one plain group (a
    concatenation, a flatten) cannot be tied, and keeps every channel. So do the inputs of a layer whose coupled
    inputs add up to more than it has (a coupling that does not hold).
    """
    for layer in layers.values():
        if layer.kind == "depthwise":
            continue
        coupled = sum(groups[g].channels * per for g, per in layer.in_sources)
        if layer.groups > 1:
            one_source = len(layer.in_sources) == 1 and layer.in_sources[0][1] == 1 and coupled == layer.in_features
            for g, _per in layer.in_sources:
                if one_source:
                    _tie(groups[g], layer.groups)
                else:
                    groups[g].prunable = False
            _tie(groups[layer.out_group], layer.groups)
        elif coupled > layer.in_features:
            for g, _per in layer.in_sources:
                groups[g].prunable = False
        if coupled > layer.in_features:
            layer.in_sources = []


def _find_heads(model: nn.Module, groups: dict[str, ChannelGroup]) -> None:
    """Groups of attention projections decide head by head (ChannelGroup.span); see zerobit.graph.heads."""
    for group in groups.values():
        spans = {head_size(model, name) for name in group.layers}
        span = spans.pop() if len(spans) == 1 else 1  # every layer of the group a head projection of one size
        if span > 1:
            if group.channels % (span * group.tie) or group.channels // group.tie == span:
                group.prunable = False  # heads that cannot be told apart, or one per tied block: keep every channel
            else:
                group.span = span


def _tie(group: ChannelGroup, blocks: int) -> None:
    tie = math.lcm(group.tie, blocks)
    if group.channels % tie or group.channels == tie:  # no whole blocks, or one channel per block: keep all
        group.prunable = False
    else:
        group.tie = tie
