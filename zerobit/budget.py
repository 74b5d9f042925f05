"""Budgets in real terms — bytes of the written file, bit-operations, MACs — and the costs behind them."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from zerobit.graph import ModelGraph
from zerobit.policy import FLOAT_BITS, GroupDecision, Policy, aligned_count, aligns, repeat
from zerobit.quant.apply import KeptCounts, kept_per_channel, weights_per_channel


class BudgetError(ValueError):
    """No policy can meet the budget."""


def macs(graph: ModelGraph, policy: Policy) -> int:
    """Multiply-accumulates per sample of the pruned model."""
    total = 0
    for name, layer in graph.layers.items():
        total += policy[layer.out_group].kept * kept_per_channel(graph, policy, name) * layer.out_area
    return total


def layer_bops(graph: ModelGraph, name: str, kept: Mapping[str, Any], bits_sum: Any, act_bits: Any) -> Any:
    """Bit-operations of layer `name` per sample: Σ over its kept output channels of the channel's weight bits
    (`bits_sum`), times the weights per channel, output positions and input activation bits. Ints give the
    exact count; tensors (SBS's gates) a differentiable one."""
    layer = graph.layers[name]
    return bits_sum * weights_per_channel(graph, kept, name) * layer.out_area * act_bits


def bops(graph: ModelGraph, policy: Policy) -> int:
    """Bit-operations per sample: Σ MACs · weight bits · activation bits (float counts as 32)."""
    kept = KeptCounts(policy)
    return int(round(sum(layer_bops(graph, name, kept, sum(policy[layer.out_group].kept_bits()), policy.act_of(name))
                         for name, layer in graph.layers.items())))


def file_bytes(graph: ModelGraph, policy: Policy) -> int:
    """Bytes of the .zbit file written for `policy` (exact; see zerobit.export.zbit)."""
    from zerobit.export.zbit import estimate_bytes

    return estimate_bytes(graph, policy)


def amount(value: float) -> str:
    """A cost or limit as messages print it: whole numbers with thousands separators (bytes, BOPs, MACs), four
    significant digits below 100 (milliseconds)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def float_policy(graph: ModelGraph) -> Policy:
    """Every channel kept in float, float activations: the uncompressed reference."""
    return Policy({n: GroupDecision((FLOAT_BITS,) * g.channels) for n, g in graph.groups.items()}, FLOAT_BITS)


CALIBRATION_KEEP = (1.0, 0.75, 0.3)  # of every prunable group's channels (rounded to multiples of 8), at 8 bits


def calibration_policies(graph: ModelGraph, act_bits: int = 8) -> list[Policy]:
    """What a Latency budget is calibrated on: uniform policies keeping `CALIBRATION_KEEP` of every prunable
    group's channels, rounded to multiples of 8, at 8 bits (the widths onnxruntime runs fast); a policy equal to an
    earlier one (a model of small groups) is left out."""
    import torch

    from zerobit.policy import uniform_policy

    scores = {n: torch.zeros(g.channels) for n, g in graph.groups.items()}  # which channels: latency does not care
    policies: list[Policy] = []
    for keep in CALIBRATION_KEEP:
        policy = uniform_policy(graph, scores, keep, 8, act_bits, multiple=8)
        if all(policy.groups != p.groups for p in policies):
            policies.append(policy)
    return policies


def smallest_policy(graph: ModelGraph, act_bits: int = 8, min_bits: int = 2, multiple: int = 1) -> Policy:
    """One channel per prunable group (one per block of a tied group; with `multiple` > 1, as many as
    `aligned_count` keeps at least), every channel at `min_bits`."""
    groups = {}
    for n, g in graph.groups.items():
        kept = g.block if not g.prunable else aligned_count(1, g.block, multiple) if aligns(g, multiple) else 1
        groups[n] = repeat(GroupDecision((min_bits,) * kept + (0,) * (g.block - kept)), g.tie, g.span)
    return Policy(groups, act_bits)


@dataclass(frozen=True)
class Budget:
    """Base of all budgets: `cost` of a policy must not exceed `limit`."""

    def cost(self, graph: ModelGraph, policy: Policy) -> float:
        raise NotImplementedError

    def limit(self, graph: ModelGraph) -> float:
        raise NotImplementedError

    def reference(self, graph: ModelGraph) -> float:
        """Cost of the uncompressed model, for fractions and reports."""
        return self.cost(graph, float_policy(graph))

    def check_feasible(self, graph: ModelGraph, act_bits: int, multiple: int = 1) -> None:
        """Raise BudgetError at once when even the smallest policy (kept channels rounded to `multiple`) misses
        the budget."""
        floor = self.cost(graph, smallest_policy(graph, act_bits, multiple=multiple))
        if floor > self.limit(graph):
            raise BudgetError(f"budget {self} = {self.limit(graph):,.0f} {self.unit} cannot be met: the smallest "
                              f"achievable is {floor:,.0f} {self.unit} ({_fewest(multiple)} per group at 2 bits, "
                              f"{act_bits}-bit activations)")

    unit = ""
    channel_multiple = 1  # the widths compress searches when it is given no channel_multiple (see Latency)

    def default_multiple(self, graph: ModelGraph, act_bits: int) -> int:
        """compress's channel_multiple when none is given."""
        return self.channel_multiple


def _fewest(multiple: int) -> str:
    """The fewest channels a group keeps, in words, for refusals."""
    if multiple == 1:
        return "one channel"
    return f"{multiple} channels (or all of a smaller group; channel_multiple={multiple})"


@dataclass(frozen=True)
class Size(Budget):
    """Bytes of the .zbit file: give exactly one of bytes, kilobytes (1000 B) or fraction of the fp32 file.

    Example:
        >>> Size(kilobytes=40).limit(None)
        40000.0
    """

    bytes: int | None = None
    kilobytes: float | None = None
    fraction: float | None = None
    unit = "bytes"

    def __post_init__(self) -> None:
        given = [v for v in (self.bytes, self.kilobytes, self.fraction) if v is not None]
        if len(given) != 1 or given[0] <= 0:
            raise ValueError("Size needs exactly one positive value: bytes=, kilobytes= or fraction=")

    def cost(self, graph: ModelGraph, policy: Policy) -> float:
        return file_bytes(graph, policy)

    def reference(self, graph: ModelGraph) -> float:
        return graph.fp32_bytes

    def limit(self, graph: ModelGraph) -> float:
        if self.bytes is not None:
            return float(self.bytes)
        if self.kilobytes is not None:
            return self.kilobytes * 1000.0
        return self.fraction * graph.fp32_bytes


@dataclass(frozen=True)
class _Counted(Budget):
    value: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.value, self.fraction) if v is not None]
        if len(given) != 1 or given[0] <= 0:
            raise ValueError(f"{type(self).__name__} needs exactly one positive value: value= or fraction=")

    def limit(self, graph: ModelGraph) -> float:
        return float(self.value) if self.value is not None else self.fraction * self.reference(graph)


@dataclass(frozen=True)
class BOPs(_Counted):
    """Bit-operations per sample (fraction = of the fp32 model's 32×32-bit BOPs)."""

    unit = "BOPs"

    def cost(self, graph: ModelGraph, policy: Policy) -> float:
        return bops(graph, policy)


@dataclass(frozen=True)
class MACs(_Counted):
    """Multiply-accumulates per sample (fraction = of the unpruned model's)."""

    unit = "MACs"

    def cost(self, graph: ModelGraph, policy: Policy) -> float:
        return macs(graph, policy)


_TABLES: dict[tuple, object] = {}  # (batch, threads, cache folder) → LatencyTable, shared by Latency budgets


@dataclass(frozen=True)
class Latency(Budget):
    """Milliseconds of one onnxruntime call of the exported model on this machine (fraction = of the fp32
    model's), predicted from a per-layer table measured once per machine (zerobit.export.latency) times `scale`,
    set by `measured_against` from measured times of the model's `calibration_policies` (layers timed alone run
    faster or slower than in a whole model, and the machine runs faster or slower from one hour to the next).
    `compress` searches it over widths of multiples of 8 where they can reach it (`default_multiple`).

    Example:
        >>> Latency(ms=2.5, batch=64).unit
        'ms'
    """

    ms: float | None = None
    fraction: float | None = None
    batch: int = 1
    runtime: str = "onnxruntime"
    threads: int = 1
    scale: float = 1.0
    unit = "ms"
    # onnxruntime's integer convolutions run hardly faster at 4–7 channels than at 8 and slower at most widths
    # between multiples of 8 than at the next multiple (bench/widths.py): latencies are searched over multiples of
    # 8 where they can reach the budget (default_multiple)
    channel_multiple = 8

    def __post_init__(self) -> None:
        given = [v for v in (self.ms, self.fraction) if v is not None]
        if len(given) != 1 or given[0] <= 0:
            raise ValueError("Latency needs exactly one positive value: ms= or fraction=")
        if self.runtime != "onnxruntime":
            raise ValueError(f"Latency runtime {self.runtime!r} is not supported; use 'onnxruntime'")
        if self.batch < 1 or self.threads < 0:
            raise ValueError("Latency needs batch ≥ 1 and threads ≥ 0 (0 = onnxruntime's default)")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"Latency scale must be a positive number, not {self.scale!r}")

    def table(self):
        from zerobit.export.latency import LatencyTable, cache_dir

        key = (self.batch, self.threads, str(cache_dir()))
        if key not in _TABLES:
            _TABLES[key] = LatencyTable(self.batch, self.threads)
        return _TABLES[key]

    def cost(self, graph: ModelGraph, policy: Policy) -> float:
        return self.scale * self.table().predict(graph, policy)

    def measured_against(self, model, graph: ModelGraph, example, data, act_bits: int = 8) -> Latency:
        """This budget fitted to `model` (`calibrated`, on its `calibration_policies`, each exported and measured
        for 0.4 s in two rounds: `measure_policies`); and a fraction becomes that fraction of the fp32 model's
        measured milliseconds."""
        from zerobit.export.latency import measure_float, measure_policies

        policies = calibration_policies(graph, act_bits)
        measured = measure_policies(model, graph, policies, example, data, self.batch, self.threads)
        ms = self.ms if self.fraction is None else \
            self.fraction * measure_float(model, example, data, self.batch, self.threads)
        return dataclasses.replace(self, ms=ms, fraction=None).calibrated(graph, policies, measured)

    def calibrated(self, graph: ModelGraph, policies: list[Policy], measured_ms: list[float]) -> Latency:
        """This budget with `scale` = the geometric mean of measured / predicted milliseconds over `policies` (the
        one place the scale is set). Several policies, from full width down: one timing of one policy can be off by
        10–20% on a busy machine, and the table errs differently at different widths. In three runs of the check in
        BENCHMARKS.md ("Latency table vs whole-model timings") policies of widths ×8 erred by 5.4, 6.2 and 6.5% on
        average with these three, 6.5, 8.1 and 6.3% with the 3/4 policy alone; fitting a power of the table as
        well was no better."""
        predicted = [self.table().predict(graph, p) for p in policies]
        ratios = np.log(np.asarray(measured_ms, dtype=float) / np.asarray(predicted, dtype=float))
        return dataclasses.replace(self, scale=float(np.exp(ratios.mean())))

    def limit(self, graph: ModelGraph) -> float:
        return float(self.ms) if self.ms is not None else self.fraction * self.reference(graph)

    def floor(self, graph: ModelGraph, act_bits: int, multiple: int = 1) -> float:
        """Predicted milliseconds of the fastest policy: the fewest channels per group (rounded to `multiple`),
        in the fastest weight format."""
        return min(self.cost(graph, smallest_policy(graph, act_bits, bits, multiple)) for bits in (2, 6, 8))

    def check_feasible(self, graph: ModelGraph, act_bits: int, multiple: int = 1) -> None:
        """Refuse a latency below the fastest policy (`floor`)."""
        floor = self.floor(graph, act_bits, multiple)
        if floor > self.limit(graph):
            raise BudgetError(f"budget {self} = {self.limit(graph):.3f} ms cannot be met: the fastest policy "
                              f"({_fewest(multiple)} per group) takes {floor:.3f} ms at batch {self.batch} on "
                              f"{self.threads or 'all'} thread(s) of this machine")

    def default_multiple(self, graph: ModelGraph, act_bits: int) -> int:
        """`channel_multiple` (8) where the fastest policy of such widths is predicted at most ALIGNED_REACH of the
        budget, else 1: a budget only much narrower widths reach is searched over every width (1–3 channels of a
        conv run faster than 8; on ResNet-20 at batch 64 a quarter of fp32's latency needs them)."""
        reach = self.floor(graph, act_bits, self.channel_multiple) <= ALIGNED_REACH * self.limit(graph)
        return self.channel_multiple if reach else 1


ALIGNED_REACH = 0.9  # the table errs by up to ~20% on one policy: room for the search near the floor


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def _latency(text: str) -> Latency:
    """'2.5ms', '1/4', '2.5ms,batch=64,threads=2' → Latency."""
    first, *options = [part.strip() for part in text.split(",")]
    settings = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("batch", "threads") or not value.isdigit():
            raise ValueError(f"latency option {option!r}: use batch=N or threads=N")
        settings[key] = int(value)
    if first.lower().endswith("ms"):
        return Latency(ms=float(first[:-2]), **settings)
    value, fraction = _number(first)
    if fraction is None:
        raise ValueError(f"latency {first!r}: write milliseconds like 2.5ms, or a fraction of fp32's like 1/4")
    return Latency(fraction=fraction, **settings)


def _number(text: str) -> tuple[float | None, float | None]:
    """'1/32' → fraction; '0.05' (<1) → fraction; '40K' → value."""
    if "/" in text:
        num, den = text.split("/", 1)
        return None, float(num) / float(den)
    m = re.fullmatch(r"([0-9.eE+-]+)\s*([KMG]?)", text.upper())
    if not m:
        raise ValueError(f"cannot read the number {text!r}")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    return (None, value) if value < 1 and not m.group(2) else (value, None)


def parse_budget(text: str) -> Budget:
    """Read a budget from the command line.

    Forms: '1/32' (of fp32 file bytes), '40KB', '40000B', 'bops=1/64', 'bops=2e8', 'macs=1/4', 'macs=5M',
    'latency=2.5ms', 'latency=1/4' (of fp32's), 'latency=2.5ms,batch=64,threads=2'.

    Example:
        >>> parse_budget("40KB")
        Size(bytes=None, kilobytes=40.0, fraction=None)
    """
    t = text.strip()
    kind, _, rest = t.partition("=")
    if rest and kind.lower() == "latency":
        return _latency(rest)
    if rest:
        value, fraction = _number(rest)
        cls = {"bops": BOPs, "macs": MACs}.get(kind.lower())
        if cls is None:
            raise ValueError(f"unknown budget kind {kind!r}: use bops=…, macs=…, latency=… or a size like 40KB or "
                             "1/32")
        return cls(value=value, fraction=fraction)
    up = t.upper()
    if up.endswith("KB"):
        return Size(kilobytes=float(up[:-2]))
    if up.endswith("MB"):
        return Size(kilobytes=float(up[:-2]) * 1000)
    if up.endswith("B"):
        return Size(bytes=int(float(up[:-1])))
    value, fraction = _number(t)
    if fraction is None:
        raise ValueError(f"budget {text!r} is ambiguous: write 40KB, 40000B, a fraction like 1/32, or bops=/macs=")
    return Size(fraction=fraction)
