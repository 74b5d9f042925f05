"""Fixes to Torch-Pruning 1.6.1 (pinned in pyproject): concatenations and splits of unknown sizes (applied when
zerobit.graph is imported), and a bounded walk over coupled channels (`pruning_group`).

The concatenation index mapping sums the channel counts of a `torch.cat`'s inputs before it checks that each
is known, so a model that concatenates along a dimension it cannot size (GPT-2's key/value cache,
``torch.cat([past, k], dim=-2)``) fails to trace with ``TypeError: ... 'int' and 'NoneType'``. Torch-Pruning's
own next step leaves such a concatenation without an index mapping; the fix takes that path before the sum.
Likewise, removing channels that pass through such a concatenation or a split it cannot size (GPT-2's
``qkv.split(self.split_size, dim=2)``) fails: their sizes are bookkeeping only (the model's code splits by its own
attribute, which zerobit.graph.heads updates), so they are left unknown.
"""

from __future__ import annotations

from typing import Any

from torch_pruning import ops
from torch_pruning.dependency import graph as graph_module
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.group import Group as _Group

_original = index_mapping.update_concat_index_mapping


def _update_concat_index_mapping(graph: Any, cat_node: Any) -> None:
    try:
        _original(graph, cat_node)
    except TypeError:
        if None not in (getattr(cat_node.module, "concat_sizes", None) or ()):
            raise  # not the unknown-size case


if getattr(index_mapping.update_concat_index_mapping, "__module__", "") != __name__:
    index_mapping.update_concat_index_mapping = _update_concat_index_mapping

def _sizes_known(pruner: type, sizes: str) -> None:
    """Make `pruner` skip a concatenation or split whose sizes (attribute `sizes`) are not all known."""
    original = pruner.prune_out_channels
    if getattr(original, "__module__", "") == __name__:
        return

    def prune(self: Any, layer: Any, idxs: Any) -> None:
        if None not in (getattr(layer, sizes, None) or ()):
            original(self, layer, idxs)

    pruner.prune_out_channels = pruner.prune_in_channels = prune


_sizes_known(ops.ConcatPruner, "concat_sizes")
_sizes_known(ops.SplitPruner, "split_sizes")


class CouplingLoopError(RuntimeError):
    """Torch-Pruning's walk over a layer's coupled channels does not end (see `pruning_group`)."""


def pruning_group(dg: Any, module: Any, idxs: list[int]) -> Any:
    """`dg.get_pruning_group(module, <its out-channel pruner>, idxs)`, bounded.

    Torch-Pruning collects a group by walking index mappings until no new (layer, indices) pair appears. Around
    rotary position embeddings (LLaMA, Qwen, Mistral: ``cat((-x2, x1), dim=-1)`` of a slice of q and k) each lap
    maps the indices to a new set, so the walk never ends (Torch-Pruning issues #337, #527). A group larger than
    any the graph can hold raises `CouplingLoopError` instead; the caller keeps those channels.
    """
    limit = 8 * len(dg.module2node) + 64

    class Bounded(_Group):
        def add_dep(self, dep: Any, idxs: Any) -> None:
            if len(self._group) >= limit:
                raise CouplingLoopError(f"the channel coupling of {type(module).__name__} does not close")
            super().add_dep(dep, idxs)

    graph_module.Group = Bounded
    try:
        return dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    finally:
        graph_module.Group = _Group
