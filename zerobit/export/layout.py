"""Where every value of a layer goes in a .zbit file, computed from the policy alone (so sizes are exact).

Dense layers store one code per weight of every kept channel, grouped by bit-width. A layer with unstructured
sparsity (one bit-width for all its kept channels) stores codes of its nonzero weights only, plus their
positions, coded as whichever is smaller for the counts at hand: a bitmap (one bit per weight) or an index list
(per channel: a count, then the index of each nonzero within the channel).

A layer that shares an earlier layer's weight (tied weights, see zerobit.graph.tied) stores only its bias: its
weight is the earlier layer's, decoded from that layer's codes and scales.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from zerobit.graph import ModelGraph
from zerobit.policy import FLOAT_BITS, Policy, kept_weights
from zerobit.quant.apply import kept_per_channel
from zerobit.quant.pack import pack, packed_bytes, unpack

PACKED_BITS = (2, 3, 4, 5, 6, 8)


def _index_widths(per: int) -> tuple[int, int]:
    """Bits of a per-channel count (0…per) and of an index (0…per−1)."""
    return max(1, per.bit_length()), max(1, (per - 1).bit_length())


def position_bytes(channels: int, per: int, nnz: int) -> int:
    """Bytes of the cheaper position code for `nnz` nonzeros among `channels`×`per` weights."""
    count_bits, index_bits = _index_widths(per)
    return min(packed_bytes(channels * per, 1), packed_bytes(channels, count_bits) + packed_bytes(nnz, index_bits))


def encode_positions(mask: np.ndarray) -> np.ndarray:
    """Position code of a (channels, per) 0/1 mask: bitmap or index list, whichever is smaller."""
    channels, per = mask.shape
    nnz = int(mask.sum())
    if packed_bytes(channels * per, 1) == position_bytes(channels, per, nnz):
        return pack(mask.ravel().astype(np.int64), 1, signed=False)
    count_bits, index_bits = _index_widths(per)
    counts = mask.sum(axis=1).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int64)
    return np.concatenate([pack(counts, count_bits, signed=False), pack(indices, index_bits, signed=False)])


def decode_positions(data: np.ndarray, channels: int, per: int, nnz: int) -> np.ndarray:
    """Inverse of `encode_positions` (the counts say which code was used).

    Raises:
        ValueError: when the code does not describe exactly `nnz` distinct positions in ascending order.
    """
    if packed_bytes(channels * per, 1) == position_bytes(channels, per, nnz):
        mask = unpack(data, 1, channels * per, signed=False).reshape(channels, per)
        if int(mask.sum()) != nnz:
            raise ValueError("position code does not match the nonzero count")
        return mask
    count_bits, index_bits = _index_widths(per)
    head = packed_bytes(channels, count_bits)
    counts = unpack(data[:head], count_bits, channels, signed=False)
    indices = unpack(data[head:], index_bits, nnz, signed=False)
    if counts.sum() != nnz or (counts > per).any() or (indices >= per).any():
        raise ValueError("position code does not match the nonzero count")
    rows = np.repeat(np.arange(channels), counts)
    if (np.diff(indices)[rows[1:] == rows[:-1]] <= 0).any():
        raise ValueError("position code repeats or reorders a position")
    mask = np.zeros((channels, per), dtype=np.int64)
    mask[rows, indices] = 1
    return mask


@dataclass
class LayerLayout:
    """Counts of one layer in the file."""

    name: str
    kept_bits: list[int]
    weights_per_channel: int
    has_bias: bool
    sparsity: float = 0.0
    codebook: bool = False
    shared: bool = False  # the weight is an earlier layer's: no codes, scales or float weights of its own
    removed: bool = False  # its group is removed whole: nothing stored (a reader's constant is an extra tensor)

    @cached_property
    def _counts(self) -> Counter:
        return Counter(self.kept_bits)

    def count(self, bits: int) -> int:
        return self._counts[bits]

    @property
    def single_width(self) -> bool:
        """Sparse and codebook layers code every stored weight with one bit-width."""
        return self.sparsity > 0 or self.codebook

    @property
    def nnz(self) -> int:
        """Weights stored: all of the kept channels, less the zeros of unstructured sparsity."""
        return kept_weights(len(self.kept_bits) * self.weights_per_channel, self.sparsity)

    @property
    def code_bytes(self) -> int:
        if self.shared or self.removed:
            return 0
        if self.single_width:
            return packed_bytes(self.nnz, self.kept_bits[0])
        return sum(packed_bytes(self.count(b) * self.weights_per_channel, b) for b in PACKED_BITS)

    @property
    def position_bytes(self) -> int:
        if self.sparsity == 0 or self.shared or self.removed:
            return 0
        return position_bytes(len(self.kept_bits), self.weights_per_channel, self.nnz)

    @property
    def book_entries(self) -> int:
        return 2 ** self.kept_bits[0] if self.codebook and not (self.shared or self.removed) else 0

    @property
    def scales(self) -> int:
        return 0 if self.shared or self.removed else len(self.kept_bits) - self.count(FLOAT_BITS)

    @property
    def floats(self) -> int:
        return 0 if self.shared or self.removed else self.count(FLOAT_BITS) * self.weights_per_channel


def layer_layouts(graph: ModelGraph, policy: Policy) -> Iterator[LayerLayout]:
    """Layout of every layer of `graph` under `policy`, in graph order."""
    gone = policy.removed_layers(graph)
    for name, layer in graph.layers.items():
        per = kept_per_channel(graph, policy, name)
        decision = policy.layer(layer.shares or name)  # a shared weight is its owner's, sparsity and all
        yield LayerLayout(name, policy[layer.out_group].kept_bits(), per,
                          (layer.has_bias or layer.bn is not None) and name not in gone,
                          decision.sparsity, decision.codebook, layer.shares is not None, name in gone)
