"""Policy: for every coupled channel group, the bits each channel keeps (0 = removed, 32 = float).

A Policy is what every strategy produces and what cost, fine-tuning and export consume. It is keyed by the
group names of a `ModelGraph`; coupled channels share one entry, so they always get the same decision.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from zerobit.graph import ModelGraph
from zerobit.graph.emptying import emptied_layers

BIT_CHOICES = (0, 2, 3, 4, 5, 6, 8)
FLOAT_BITS = 32
ALL_BITS = BIT_CHOICES + (FLOAT_BITS,)
ACT_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)
VERSION = 2  # 2: per-layer activation bits ("act"); version-1 files (one act_bits) still load
READS = (1, VERSION)
_CHAR = {b: str(b) for b in BIT_CHOICES} | {FLOAT_BITS: "f"}
_BITS = {c: b for b, c in _CHAR.items()}


@dataclass(frozen=True)
class GroupDecision:
    """Bits of every channel of one coupled group, in the group's channel order."""

    bits: tuple[int, ...]

    def __post_init__(self) -> None:
        bad = sorted({b for b in self.bits if b not in ALL_BITS})
        if bad:
            raise ValueError(f"bit-widths {bad} are not supported; choose from {ALL_BITS} (32 = float, 0 = removed)")

    @property
    def channels(self) -> int:
        return len(self.bits)

    @cached_property  # costs sum this over many candidate policies
    def kept(self) -> int:
        return sum(1 for b in self.bits if b > 0)

    def kept_bits(self) -> list[int]:
        """Bits of the surviving channels, in order."""
        return [b for b in self.bits if b > 0]

    def removed_indices(self) -> list[int]:
        return [i for i, b in enumerate(self.bits) if b == 0]


@dataclass(frozen=True)
class LayerDecision:
    """Per-layer options on top of the channel bits (both need one bit-width for all kept channels).

    Attributes:
        sparsity: fraction of the kept channels' weights set to zero, the smallest magnitudes first
            (unstructured pruning; positions are stored in the file and counted in its bytes).
        codebook: weights index a per-layer codebook (k-means centroids) instead of a uniform grid.
    """

    sparsity: float = 0.0
    codebook: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        object.__setattr__(self, "sparsity", min(0.9999, round(float(self.sparsity), 4)))  # stored as 1/10000s

    @property
    def is_default(self) -> bool:
        return self.sparsity == 0.0 and not self.codebook


DENSE = LayerDecision()


def kept_weights(total: int, sparsity: float) -> int:
    """Weights that survive `sparsity` out of `total` (the file and the masks agree on this count)."""
    return total - int(round(sparsity * total))


@dataclass(frozen=True)
class Policy:
    """Per-group channel bits plus the activation bit-width (32 = float activations).

    `act_bits` is every layer's input bit-width unless `act` names another for a layer (layer name → bits; SBS
    searches them). `layers` optionally adds per-layer unstructured sparsity or codebook quantization (see
    LayerDecision).

    Example:
        >>> p = Policy({"conv1": GroupDecision((8, 0, 4))}, act_bits=8)
        >>> Policy.from_dict(p.to_dict()) == p
        True
    """

    groups: Mapping[str, GroupDecision]
    act_bits: int = 8
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    layers: Mapping[str, LayerDecision] = field(default_factory=dict)
    act: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", {n: d for n, d in self.layers.items() if not d.is_default})
        object.__setattr__(self, "act", {n: int(b) for n, b in self.act.items() if b != self.act_bits})
        bad = sorted({b for b in (self.act_bits, *self.act.values()) if b not in ACT_BITS})
        if bad:
            raise ValueError(f"activation bits {bad} are not supported; choose from {ACT_BITS}")

    def act_of(self, layer: str) -> int:
        """Bits of `layer`'s input activations (32 = float)."""
        return self.act.get(layer, self.act_bits)

    def quantizes_activations(self, layers: Iterable[str]) -> bool:
        """Whether any of `layers` has quantized inputs."""
        return any(self.act_of(n) < FLOAT_BITS for n in layers)

    def __getitem__(self, name: str) -> GroupDecision:
        return self.groups[name]

    def layer(self, name: str) -> LayerDecision:
        """The per-layer decision of `name` (dense, uniform grid unless set)."""
        return self.layers.get(name, DENSE)

    def validate(self, graph: ModelGraph) -> None:
        """Raise ValueError unless this policy fits `graph` group by group."""
        if set(self.groups) != set(graph.groups):
            missing, extra = set(graph.groups) - set(self.groups), set(self.groups) - set(graph.groups)
            raise ValueError(f"policy does not match the model: missing groups {sorted(missing)}, "
                             f"unknown groups {sorted(extra)}")
        for name, g in graph.groups.items():
            d = self.groups[name]
            if d.channels != g.channels:
                raise ValueError(f"group {name!r}: policy has {d.channels} channels, the model {g.channels}")
            if d.kept == 0 and not g.empties:
                raise ValueError(f"group {name!r}: every channel is removed; keep at least one (only a group whose "
                                 "readers read nothing else, such as a residual branch, can go whole)")
            if not g.prunable and d.kept != d.channels:
                raise ValueError(f"group {name!r} cannot lose channels (it feeds the model output, or removing "
                                 "its channels would not be exact)")
            if g.tie > 1 and d.bits != d.bits[:g.channels // g.tie] * g.tie:
                raise ValueError(f"group {name!r}: its channels are tied in {g.tie} blocks of {g.channels // g.tie} (a grouped "
                                 "convolution reads or writes them): channel i of every block needs the same bits")
            if g.span > 1 and d != repeat(decisions_of(d, g.tie, g.span), g.tie, g.span):
                raise ValueError(f"group {name!r}: its channels form heads of {g.span} (attention heads): every "
                                 "channel of a head needs the same bits")
        unknown = sorted(set(self.act) - set(graph.layers))
        if unknown:
            raise ValueError(f"policy sets activation bits of layers {unknown[:3]}, which the model does not have")
        gone = self.removed_layers(graph)
        for name, decision in self.layers.items():
            if name not in graph.layers:
                raise ValueError(f"policy sets layer {name!r}, which the model does not have")
            if name in gone:
                raise ValueError(f"policy sets sparsity or a codebook for layer {name!r}, whose group it removes whole")
            bits = set(self.groups[graph.layers[name].out_group].kept_bits())
            if not decision.is_default and (len(bits) != 1 or FLOAT_BITS in bits):
                raise ValueError(f"layer {name!r}: sparsity/codebook need one integer bit-width for all kept "
                                 f"channels of group {graph.layers[name].out_group!r}, got {sorted(bits)}")

    def emptied(self, graph: ModelGraph) -> tuple[set[str], set[str]]:
        """(producers, readers): the layers of the groups this policy keeps no channel of, and the layers that
        read only such groups (they output a constant; zerobit.graph.emptying)."""
        return emptied_layers(graph.layers, {n: d.kept for n, d in self.groups.items()})

    def removed_layers(self, graph: ModelGraph) -> set[str]:
        """Layers this policy removes whole (`emptied`, both kinds)."""
        producers, readers = self.emptied(graph)
        return producers | readers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: one bit-character per channel ('f' = float)."""
        out = {"version": VERSION, "act_bits": self.act_bits, "meta": dict(self.meta),
               "groups": {n: "".join(_CHAR[b] for b in d.bits) for n, d in self.groups.items()}}
        if self.layers:
            out["layers"] = {n: asdict(d) for n, d in self.layers.items() if not d.is_default}
        if self.act:
            out["act"] = dict(self.act)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        if data.get("version") not in READS:
            raise ValueError(f"policy version {data.get('version')!r} is not supported (this zerobit reads "
                             f"{', '.join(map(str, READS))})")
        try:
            groups = {n: GroupDecision(tuple(_BITS[c] for c in s)) for n, s in data["groups"].items()}
        except KeyError as exc:
            raise ValueError(f"policy has an unknown bit character {exc}") from exc
        layers = {n: LayerDecision(float(d.get("sparsity", 0.0)), bool(d.get("codebook", False)))
                  for n, d in data.get("layers", {}).items()}
        act = {n: int(b) for n, b in data.get("act", {}).items()}
        return cls(groups, int(data["act_bits"]), dict(data.get("meta", {})), layers, act)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> Policy:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def with_bits(self, bits: int) -> Policy:
        """The same channels kept, every kept channel at `bits`."""
        return Policy({n: GroupDecision(tuple(bits if b else 0 for b in d.bits)) for n, d in self.groups.items()},
                      self.act_bits, self.meta, self.layers, self.act)

    def __str__(self) -> str:
        lines = [f"{'group':28} {'kept':>9}  bits (channels)", "-" * 60]
        for name, d in self.groups.items():
            hist = Counter(d.kept_bits())
            bits = ", ".join(f"{'float' if b == FLOAT_BITS else b}b×{n}" for b, n in sorted(hist.items())) \
                or "removed whole"
            lines.append(f"{name:28} {d.kept:>4}/{d.channels:<4}  {bits}")
        for name, d in self.layers.items():
            if not d.is_default:
                lines.append(f"  layer {name}: {d.sparsity:.0%} of weights zero" + (", codebook" if d.codebook else ""))
        lines.append(f"activations: {_bits_name(self.act_bits)}" + (" (other layers: " + ", ".join(
            f"{n} {_bits_name(b)}" for n, b in self.act.items()) + ")" if self.act else ""))
        return "\n".join(lines)


def _bits_name(bits: int) -> str:
    return "float" if bits == FLOAT_BITS else f"{bits}-bit"


def tied_scores(scores: torch.Tensor, tie: int, span: int = 1) -> torch.Tensor:
    """One score per decision of a group: summed over tied copies (ChannelGroup.tie) and over the channels of a
    span (ChannelGroup.span, e.g. one attention head)."""
    if tie > 1:
        scores = scores.view(tie, -1).sum(0)
    return scores.view(-1, span).sum(1) if span > 1 else scores


def repeat(decision: GroupDecision, tie: int, span: int = 1) -> GroupDecision:
    """A group's full decision from one entry per decision (the inverse of `tied_scores`)."""
    bits = tuple(b for b in decision.bits for _ in range(span)) if span > 1 else decision.bits
    return GroupDecision(bits * tie) if tie > 1 or span > 1 else decision


def decisions_of(decision: GroupDecision, tie: int, span: int = 1) -> GroupDecision:
    """One entry per decision of a full group decision (the first channel of each)."""
    return GroupDecision(decision.bits[:len(decision.bits) // tie][::span])


def keep_top(scores: torch.Tensor, kept: int, bits: int) -> GroupDecision:
    """`bits` for the `kept` highest-scoring channels, 0 for the rest (ties broken by index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:kept].tolist()
    chosen = set(order)
    return GroupDecision(tuple(bits if i in chosen else 0 for i in range(len(scores))))


def aligned_count(kept: int, block: int, multiple: int) -> int:
    """`kept` channels rounded down to a multiple of `multiple`; at least `multiple` (or the whole `block` when it
    is smaller); a group that keeps all its channels stays whole.

    Example:
        >>> aligned_count(15, 32, 8), aligned_count(5, 32, 8), aligned_count(16, 16, 8), aligned_count(3, 4, 8)
        (8, 8, 16, 4)
    """
    if multiple <= 1 or kept >= block:
        return kept
    return max(min(multiple, block), kept // multiple * multiple)


def aligns(group, multiple: int) -> bool:
    """Whether a group's kept-channel count is rounded to `multiple` (heads count by head, not by channel)."""
    return multiple > 1 and group.prunable and group.span == 1


def _with_count(graph: ModelGraph, policy: Policy, scores: Mapping[str, torch.Tensor], name: str,
                target: int) -> GroupDecision:
    """Group `name`'s decision keeping `target` channels per tied block: the lowest-scoring kept channels are
    removed, or the highest-scoring removed ones come back at the group's lowest kept bit-width."""
    g = graph.groups[name]
    decision = decisions_of(policy[name], g.tie)
    score, bits = tied_scores(scores[name], g.tie).tolist(), list(decision.bits)
    if target < decision.kept:
        kept = sorted((i for i, b in enumerate(bits) if b > 0), key=lambda i: (score[i], -i))
        for i in kept[:decision.kept - target]:
            bits[i] = 0
    else:
        low = min(decision.kept_bits())
        removed = sorted((i for i, b in enumerate(bits) if b == 0), key=lambda i: (-score[i], i))
        for i in removed[:target - decision.kept]:
            bits[i] = low
    return repeat(GroupDecision(tuple(bits)), g.tie)


def align_policy(graph: ModelGraph, policy: Policy, scores: Mapping[str, torch.Tensor], multiple: int) -> Policy:
    """`policy` with every prunable group's kept-channel count rounded as by `aligned_count` (`_with_count`).
    Runtimes run such widths in faster kernels (see README)."""
    groups = dict(policy.groups)
    for name, g in graph.groups.items():
        kept = policy[name].kept // g.tie if name in groups else 0
        if aligns(g, multiple) and kept and aligned_count(kept, g.block, multiple) != kept:
            groups[name] = _with_count(graph, policy, scores, name, aligned_count(kept, g.block, multiple))
    return replace(policy, groups=groups) if groups != policy.groups else policy


def fill_aligned(graph: ModelGraph, policy: Policy, scores: Mapping[str, torch.Tensor], multiple: int,
                 targets: Mapping[str, float], fits: Callable[[Policy], bool]) -> Policy:
    """Spend what rounding down to multiples left of the budget: groups that lost the largest share of their
    `targets` (kept channels per tied block before rounding) get `multiple` more channels, largest loss first,
    each while the policy still `fits`."""
    losses = []
    for name, g in graph.groups.items():
        kept = policy[name].kept // g.tie
        if aligns(g, multiple) and name in targets and kept < min(g.block, targets[name]):
            losses.append(((targets[name] - kept) / g.block, name))
    for _, name in sorted(losses, reverse=True):
        g = graph.groups[name]
        trial = replace(policy, groups=dict(policy.groups) | {name: _with_count(
            graph, policy, scores, name, min(g.block, policy[name].kept // g.tie + multiple))})
        if fits(trial):
            policy = trial
    return policy


def uniform_policy(graph: ModelGraph, scores: Mapping[str, torch.Tensor], keep: float, bits: int,
                   act_bits: int = 8, multiple: int = 1, empty: Iterable[str] = ()) -> Policy:
    """Same keep-ratio and bits in every group; the lowest-scoring channels are removed (kept counts rounded by
    `aligned_count` when `multiple` > 1). The groups in `empty` lose every channel (zerobit.graph.emptying).

    Example:
        >>> # policy = uniform_policy(graph, importance, keep=0.5, bits=4)
    """
    groups = {}
    for name, g in graph.groups.items():
        kept = g.block if not g.prunable else max(1, min(g.block, round(keep * g.block)))
        kept = aligned_count(kept, g.block, multiple) if aligns(g, multiple) else kept
        groups[name] = repeat(keep_top(tied_scores(scores[name], g.tie, g.span), kept, bits), g.tie, g.span)
    for name in empty:
        groups[name] = GroupDecision((0,) * graph.groups[name].channels)
    return Policy(groups, act_bits)
