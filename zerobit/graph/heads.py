"""Attention heads: find the q/k/v projections whose rows form heads, and keep the attention module's head count
right once heads are removed.

An attention module (Hugging Face BERT/ViT/GPT-style, or hand-written) keeps its head count and head size as
integer attributes and reshapes a projection's output to (B, T, heads, head size). Removing single rows of q, k or
v breaks that reshape; removing whole heads keeps it, once the head count is updated. So the channels of such a
projection are decided head by head (`ChannelGroup.span` = head size), and after pruning every attribute that
holds the head count (or heads × head size) is set to what is left. A fused q/k/v projection (GPT-2's `c_attn`) is
three such layers once split (zerobit.graph.fused); their attention module is the FusedLinear's parent.

Example:
    >>> class Attn(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.num_heads, self.head_dim = 2, 4
    ...         self.q_proj = nn.Linear(8, 8)
    >>> head_size(nn.Sequential(Attn()), "0.q_proj")
    4
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from zerobit.graph.analysis import ChannelGroup

HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "n_local_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_local_kv_heads")
KV_GROUPS_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep")  # q heads per k/v head (grouped k/v heads)
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size", "d_head", "d_k")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")  # heads × head size, where a module keeps it


def int_attr(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _parent(model: nn.Module, layer_name: str) -> nn.Module | None:
    """The module that holds `layer_name`; for the q, k or v part of a fused projection, the attention module."""
    from zerobit.graph.fused import FusedLinear

    parent = layer_name.rpartition(".")[0]
    module = model.get_submodule(parent) if parent else None
    if isinstance(module, FusedLinear):
        return _parent(model, parent)
    return module


def _attr_or_config(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    """(attribute, value) of the first of `names` the module holds as an int; else its `config`'s, with attribute
    "" (the module infers the count from the widths, like LLaMA's reshape to (B, T, -1, head_dim))."""
    found = int_attr(module, names)
    if found is None and getattr(module, "config", None) is not None:
        in_config = int_attr(module.config, names)
        found = ("", in_config[1]) if in_config is not None else None
    return found


def head_count(module: nn.Module) -> tuple[str, int] | None:
    """(attribute, value) of an attention module's head count; attribute "" when only its `config` states it."""
    return _attr_or_config(module, HEAD_COUNT_ATTRS)


def kv_head_count(module: nn.Module) -> int | None:
    """An attention module's count of key/value heads (its attribute, else its `config`'s); None: not stated."""
    found = _attr_or_config(module, KV_COUNT_ATTRS)
    return found[1] if found is not None else None


def head_size(model: nn.Module, layer_name: str) -> int:
    """The head size when `layer_name` is a Linear whose rows form the heads of its parent attention module
    (its output features = head count × head size, both attributes of the parent); else 1."""
    layer, parent = model.get_submodule(layer_name), _parent(model, layer_name)
    if not isinstance(layer, nn.Linear) or parent is None:
        return 1
    named = getattr(parent, "head_projections", None)  # where a module names them (zerobit.graph.mha)
    if named is not None and layer_name.rpartition(".")[2] not in named:
        return 1
    count, size = head_count(parent), int_attr(parent, HEAD_SIZE_ATTRS)
    if count is None or size is None or size[1] < 2 or count[1] < 2:
        return 1
    return size[1] if layer.out_features == count[1] * size[1] else 1


def update_head_counts(model: nn.Module, groups: dict[str, ChannelGroup]) -> None:
    """After pruning: set the head count (and heads × head size) of every attention module that owns one of the
    `groups` layers (layer name → its group: span = head size) from the layer's new width. The q heads of grouped
    k/v heads (`ChannelGroup.kv_heads`, zerobit.graph.rotary) also set the q heads per k/v head."""
    done: set[int] = set()
    for name, group in groups.items():
        parent = _parent(model, name)
        if parent is None or id(parent) in done:
            continue
        done.add(id(parent))
        width = model.get_submodule(name).out_features
        heads = width // group.span
        count = int_attr(parent, HEAD_COUNT_ATTRS)
        if count is not None:
            kv = int_attr(parent, KV_COUNT_ATTRS)
            if kv is not None and kv[1] == count[1] and not group.kv_heads:  # a k/v head per q head: the same go
                setattr(parent, kv[0], heads)
            setattr(parent, count[0], heads)
        per_kv = int_attr(parent, KV_GROUPS_ATTRS)
        if per_kv is not None and group.kv_heads:
            setattr(parent, per_kv[0], heads // group.kv_heads)
        for attr in WIDTH_ATTRS:
            if isinstance(getattr(parent, attr, None), int):
                setattr(parent, attr, width)
