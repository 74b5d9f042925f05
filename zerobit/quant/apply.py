"""Turn a Policy into a model: remove 0-bit channels physically, then wrap every layer in a QuantLayer."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from zerobit.device import model_device
from zerobit.graph import ModelGraph, build_dependency_graph
from zerobit.graph.analysis import run_or_explain
from zerobit.graph.emptying import empty_groups
from zerobit.graph.heads import update_head_counts
from zerobit.graph.removal import remove_channels
from zerobit.graph.tied import retie
from zerobit.policy import GroupDecision, Policy, kept_weights, tied_scores
from zerobit.quant.codebook import kmeans_1d
from zerobit.quant.modules import QuantLayer


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


class KeptCounts(Mapping):
    """Kept channels per group of a policy (a read-only view: group name → count)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def __getitem__(self, group: str) -> int:
        return self.policy[group].kept

    def __iter__(self) -> Iterator[str]:
        return iter(self.policy.groups)

    def __len__(self) -> int:
        return len(self.policy.groups)


def inputs_kept(graph: ModelGraph, kept: Mapping[str, Any], layer_name: str) -> Any:
    """Input features of `layer_name` when each group keeps `kept[group]` channels (ints, or tensors for a
    differentiable count)."""
    layer = graph.layers[layer_name]
    if layer.kind == "depthwise":
        return kept[layer.out_group]
    return layer.fixed_in + sum(kept[g] * per for g, per in layer.in_sources)


def weights_per_channel(graph: ModelGraph, kept: Mapping[str, Any], layer_name: str) -> Any:
    """Weights of one output channel of `layer_name` when each group keeps `kept[group]` channels."""
    layer = graph.layers[layer_name]
    if layer.kind == "depthwise":
        return layer.kernel_area
    return inputs_kept(graph, kept, layer_name) / layer.groups * layer.kernel_area


def kept_in_features(graph: ModelGraph, policy: Policy, layer_name: str) -> int:
    """Input features of `layer_name` once the policy's 0-bit channels are removed."""
    return inputs_kept(graph, KeptCounts(policy), layer_name)


def kept_per_channel(graph: ModelGraph, policy: Policy, layer_name: str) -> int:
    """Weights of one output channel of `layer_name` once the policy's 0-bit channels are removed."""
    layer = graph.layers[layer_name]
    if layer.kind == "depthwise":
        return layer.kernel_area
    return kept_in_features(graph, policy, layer_name) // layer.groups * layer.kernel_area


def prune_structure(model: nn.Module, graph: ModelGraph, policy: Policy, example_inputs: Any) -> nn.Module:
    """A copy of `model` with every 0-bit channel physically removed (weights of kept channels unchanged).

    Raises:
        RuntimeError: when the pruned widths disagree with the policy (Torch-Pruning skipped a group).
    """
    policy.validate(graph)
    model = copy.deepcopy(model).eval()
    dg = build_dependency_graph(model, example_inputs)
    for name, decision in policy.groups.items():
        removed = decision.removed_indices()
        if removed and decision.kept:
            remove_channels(model, dg, graph.groups[name], removed)
    update_head_counts(model, {n: graph.groups[layer.out_group] for n, layer in graph.layers.items()
                               if graph.groups[layer.out_group].span > 1})
    retie(model, graph.layers)
    empty_groups(model, graph.layers, [n for n, d in policy.groups.items() if not d.kept])
    gone = policy.removed_layers(graph)
    for name, layer in graph.layers.items():
        if name in gone:
            continue
        module = model.get_submodule(name)
        out_ch = module.weight.shape[0]
        in_ch = module.weight.shape[1] * (module.groups if isinstance(module, nn.Conv2d) else 1)
        want_out = policy[layer.out_group].kept
        want_in = kept_in_features(graph, policy, name)
        if (out_ch, in_ch) != (want_out, want_in):
            raise RuntimeError(f"layer {name!r} was pruned to {out_ch}×{in_ch} channels but the policy asks "
                               f"{want_out}×{want_in}: zerobit does not follow this model's coupling here. Keep "
                               f"this layer's channels with compress(..., ignored_layers=[{name!r}]) and report "
                               "the model to zerobit's issue tracker.")
    if any(d.kept < d.channels for d in policy.groups.values()):
        pruned = [n for n, d in policy.groups.items() if d.kept < d.channels]
        run_or_explain(model, example_inputs, f"The model's code does not allow removing channels of the groups "
                       f"{pruned[:4]}, e.g. a reshape with fixed sizes; keep them with "
                       f"compress(..., ignored_layers=[...]).")
    return model


def wrap_layers(model: nn.Module, graph: ModelGraph, policy: Policy) -> nn.Module:
    """Replace each Conv2d/Linear of a pruned model (in place) by a QuantLayer with the policy's bits."""
    gone = policy.removed_layers(graph)
    for name, layer in graph.layers.items():
        if name in gone:  # a group removed whole: Emptied and Constant modules (zerobit.graph.emptying)
            continue
        bn = model.get_submodule(layer.bn) if layer.bn else None
        q = QuantLayer(model.get_submodule(name), bn, policy[layer.out_group].kept_bits(),
                       policy.act_of(name))
        set_module(model, name, q)
        if layer.bn:
            set_module(model, layer.bn, nn.Identity())
        if layer.shares:  # tied weights: quantized once, by the layer that owns them
            q.tie_to(model.get_submodule(layer.shares))
    return model


def inference_copy(model: nn.Module, graph: ModelGraph) -> nn.Module:
    """A frozen eval-mode copy of `model` with each BatchNorm folded into its layer (same outputs, fewer passes
    over memory); on the CPU in channels-last memory format, which its convolutions run faster. For teachers."""
    fast = copy.deepcopy(model).eval()
    for name, layer in graph.layers.items():
        module = fast.get_submodule(name)
        if layer.bn and isinstance(module, nn.Conv2d):
            set_module(fast, name, fuse_conv_bn_eval(module, fast.get_submodule(layer.bn)))
            set_module(fast, layer.bn, nn.Identity())
    if model_device(fast).type == "cpu":
        fast = fast.to(memory_format=torch.channels_last)
    return fast.requires_grad_(False)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask keeping the largest-magnitude weights, exactly `kept_weights(numel, sparsity)` of them."""
    keep = kept_weights(weight.numel(), sparsity)
    mask = torch.zeros(weight.numel(), device=weight.device)
    mask[torch.topk(weight.detach().abs().flatten(), keep, sorted=False).indices] = 1.0
    return mask.view_as(weight)


def apply_layer_decisions(qmodel: nn.Module, policy: Policy) -> None:
    """Fix masks (by magnitude) and codebooks (k-means on the kept weights) of the policy's sparse/codebook layers."""
    layers = quant_layers(qmodel)
    for name, decision in policy.layers.items():
        q = layers[name]
        if q.owner is not None:  # a shared weight follows its owner's decision
            continue
        if decision.sparsity > 0:
            q.set_mask(magnitude_mask(q.layer.weight, decision.sparsity))
        if decision.codebook:
            w = q.masked_weight().detach()
            kept = w[q.mask.bool()] if q.mask is not None else w.flatten()
            q.set_codebook(kmeans_1d(kept, 2 ** int(q.bits[0])))


def drop_empty_channels(model: nn.Module, graph: ModelGraph, policy: Policy,
                        example_inputs: Any) -> tuple[Policy, nn.Module]:
    """Remove (0 bits) the channels whose weights the policy's sparsity zeroes in every layer of their group.

    Returns the new policy, with each sparse layer's sparsity counted on what is left, and a copy of `model`
    whose weights carry the zeros, to apply it to. Unchanged when no channel is empty.

    Example:
        >>> # policy, start = drop_empty_channels(model, graph, policy, torch.zeros(1, 1, 28, 28))
    """
    if not policy.layers:
        return policy, model
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, decision in policy.layers.items():
            if not graph.layers[name].shares:  # a shared weight is masked once, by its owner's decision
                w = masked.get_submodule(name).weight
                w.mul_(magnitude_mask(w, decision.sparsity))
    groups = dict(policy.groups)
    for name, group in graph.groups.items():
        rows = [masked.get_submodule(n).weight.detach().flatten(1).abs().sum(1) for n in group.layers]
        alive = (tied_scores(torch.stack(rows).sum(0), group.tie, group.span) > 0).tolist()  # per decision
        bits = tuple(b if alive[group.decision_index(i)] else 0 for i, b in enumerate(policy[name].bits))
        if group.prunable and 0 < sum(b > 0 for b in bits) < policy[name].kept:
            groups[name] = GroupDecision(bits)
    if groups == dict(policy.groups):
        return policy, model
    pruned = prune_structure(masked, graph, Policy(groups, policy.act_bits, act=policy.act), example_inputs)
    layers = {}
    for name, decision in policy.layers.items():
        w = pruned.get_submodule(graph.layers[name].shares or name).weight
        layers[name] = replace(decision, sparsity=min(0.9999, float((w == 0).sum()) / w.numel()))
    return Policy(groups, policy.act_bits, policy.meta, layers, policy.act), masked


def apply_policy(model: nn.Module, graph: ModelGraph, policy: Policy, example_inputs: Any) -> nn.Module:
    """The fake-quant model of `policy`: pruned copy of `model` whose layers are QuantLayers (eval mode).

    Example:
        >>> # qmodel = apply_policy(model, graph, policy, torch.zeros(1, 1, 28, 28))
    """
    qmodel = wrap_layers(prune_structure(model, graph, policy, example_inputs), graph, policy)
    apply_layer_decisions(qmodel, policy)
    return qmodel.eval()


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """QuantLayers of a fake-quant model, by the name of the layer they wrap."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def set_policy_bits(qmodel: nn.Module, graph: ModelGraph, policy: Policy) -> None:
    """Give an applied model new bit-widths for the same kept channels (e.g. quantize after pruning)."""
    layers = quant_layers(qmodel)
    gone = policy.removed_layers(graph)
    for name, layer in graph.layers.items():
        if name in gone:
            continue
        bits = policy[layer.out_group].kept_bits()
        if len(bits) != len(layers[name].bits):
            raise ValueError(f"layer {name!r}: the new policy keeps different channels; re-apply it instead")
        layers[name].set_bits(bits)
    for name, q in layers.items():
        if graph.layers[name].kind != "embedding":  # token ids stay as they are
            q.act.bits = policy.act_of(name)
