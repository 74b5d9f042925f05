"""Attention heads Torch-Pruning cannot walk to: q, k and v projections around rotary position embeddings.

Around rotary embeddings (LLaMA, GPT-J, Phi: ``cat((-x2, x1))`` of slices of q and k) Torch-Pruning's walk over
coupled channels never ends (zerobit.graph.tp_compat), and so does the value projection's, which reaches q and k
through the attention's matmuls: all three were left quantized only. Whole heads are what such a model can lose,
since the rotation acts within a head: a head's q, k and v rows and the output projection's columns of that
head. zerobit couples them itself where an attention module (head count H and head size d, zerobit.graph.heads)
holds exactly three Linears of H·d outputs whose walks did not end (or failed otherwise: Meta's LLaMA code
repeats k/v heads with repeat_interleave, which Torch-Pruning maps with a division by zero), all reading one
tensor, and exactly one more Linear of H·d inputs reading another (the output projection): one group deciding
head by head, whose rows and columns zerobit removes without Torch-Pruning (`ChannelGroup.readers`).

Grouped key/value heads (K k/v heads shared by H/K q heads each: Mistral, Qwen2, LLaMA 3, Gemma; K = 1: multi-query
attention): k and v, of K·d outputs, stay whole (quantized only). The q projection's heads form a group with the
output projection's columns (`ChannelGroup.kv_heads` = K), tied across the K blocks of q heads that share one k/v
head (`ChannelGroup.tie` = K): decision j keeps or removes the j-th q head of every block, so each k/v head keeps
as many q heads as the others (the attention repeats each k/v head H/K times, or maps q head i to k/v head
i // (H/K)); the module's q heads per k/v head follow (zerobit.graph.heads.update_head_counts).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zerobit.graph.heads import HEAD_SIZE_ATTRS, head_count, int_attr, kv_head_count
from zerobit.task import call


def _inputs_read(model: nn.Module, modules: list[nn.Module], example_inputs: Any) -> dict[nn.Module, int]:
    """id() of the tensor each of `modules` reads, from one forward pass."""
    seen: dict[nn.Module, int] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, id(args[0]) if args else 0)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _candidates(model: nn.Module, names: dict[nn.Module, str], layers: dict, unwalked: set[str],
                grouped: bool):
    """(layers of the head group, every q/k/v projection, output projection, k/v heads when grouped else 0) per
    attention module of the shapes the module docstring says; `grouped` False: only those with a k/v head per q
    head."""
    for parent in model.modules():
        count, size = head_count(parent), int_attr(parent, HEAD_SIZE_ATTRS)
        if count is None or size is None or count[1] < 2:
            continue
        heads, kv, width = count[1], kv_head_count(parent) or count[1], count[1] * size[1]
        children = [m for m in parent.children() if type(m) is nn.Linear and names.get(m) in layers]
        q = [m for m in children if names[m] in unwalked and m.out_features == width]
        if kv == heads and len(q) == 3:  # a k/v head per q head: q, k and v rows of a head are one decision
            qkv, kv = q, 0
            out = [m for m in children if names[m] not in unwalked and m.in_features == width]
        elif grouped and kv < heads and heads % kv == 0 and len(q) == 1:  # k and v kept whole, walked or not
            qkv = q + [m for m in children if m.out_features == kv * size[1]]
            out = [m for m in children if m not in qkv and m.in_features == width]
        else:
            continue
        if len(qkv) == 3 and len(out) == 1 and not layers[names[out[0]]].in_sources:
            yield (q if kv else qkv), qkv, out[0], kv


def merge_rotary_heads(model: nn.Module, names: dict[nn.Module, str], layers: dict, groups: dict,
                       unwalked: set[str], ignored: list[nn.Module], example_inputs: Any, grouped: bool = True) -> None:
    """One group per attention module found (see the module docstring), in the group of its first projection,
    deciding head by head (its span is set by zerobit.graph.analysis, as for any head projection); `grouped`
    False leaves attention with grouped k/v heads quantized only, as .zbit files before version 6 hold it."""
    found = list(_candidates(model, names, layers, unwalked, grouped))
    if not found:
        return
    read = _inputs_read(model, [m for _, qkv, out, _ in found for m in (*qkv, out)], example_inputs)
    for members, qkv, out, kv_heads in found:
        if len({read.get(m) for m in qkv}) != 1 or read.get(out) == read.get(qkv[0]) or None in read.values():
            continue
        first = groups[layers[names[members[0]]].out_group]
        first.layers = [names[m] for m in members]
        first.prunable = not any(m in ignored for m in members)
        first.readers = [names[out]]
        first.kv_heads, first.tie = kv_heads, max(kv_heads, 1)
        for m in members[1:]:
            del groups[layers[names[m]].out_group]
            layers[names[m]].out_group = first.name
        layers[names[out]].in_sources = [(first.name, 1)]
