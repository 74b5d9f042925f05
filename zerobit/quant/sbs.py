"""SBS's single-path quantizer (seed 002): one tensor encodes every candidate bit-width; learnable gates choose.

A value is first mapped to z ∈ [0, 1]: z = ½(clip(w/v, −1, 1) + 1) for weights and signed activations,
z = clip(x/v, 0, 1) for unsigned activations, v a learnable range. D(z, s) = s·round(z/s) with s_b = 1/(2^b − 1)
quantizes z to b bits. For a chain of widths b₁ < b₂ < … (default 2, 4, 8):

    z₁ = D(z, s₁),   ε₂ = D(z − z₁, s₂),   ε₃ = D(z − z₁ − ε₂, s₃), …
    ẑ = z₁ + g₂(ε₂ + g₃(ε₃ + …))

With the gates of widths up to b_k open and the rest closed, ẑ is exactly D(z, s_k): the b_k-bit grid contains
every narrower one because 2^a − 1 divides 2^b − 1 whenever a divides b. So each width must divide the next:
(2, 4, 8), (3, 6), (2, 6) nest; (2, 3) or (4, 6) do not and are refused.

Gates are hard indicators g = 1[t > α] of a statistic t (a residual's mean magnitude in units of the coarser
step; a channel's weight norm relative to its group's mean) against a learnable threshold α. Their gradient is
the sigmoid surrogate σ'((t − α)/τ)/τ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zerobit.quant.modules import WrapsLayer, layer_op, mask_channels
from zerobit.quant.uniform import round_ste

DEFAULT_CHAIN = (2, 4, 8)


def check_chain(bits: Sequence[int], allowed: Sequence[int], what: str = "bit-widths") -> tuple[int, ...]:
    """The sorted chain of candidate widths, or a ValueError saying why it cannot nest."""
    chain = tuple(sorted({int(b) for b in bits}))
    bad = [b for b in chain if b not in allowed]
    if not chain or bad:
        raise ValueError(f"SBS {what} {tuple(bits)}: choose one or more of {tuple(allowed)}")
    for a, b in zip(chain, chain[1:], strict=False):
        if b % a:
            raise ValueError(f"SBS {what} {chain}: {a} does not divide {b}, so the {b}-bit grid does not contain the "
                             f"{a}-bit one (2^{a}−1 must divide 2^{b}−1) and the residuals would not nest; use a chain "
                             "where each width divides the next, e.g. (2, 4, 8) or (3, 6)")
    return chain


def step(bits: int) -> float:
    """s_b = 1/(2^b − 1): the grid step of b bits on [0, 1]."""
    return 1.0 / (2**bits - 1)


def quantize_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    """D(z, s_b): `z` ∈ [0, 1] on the b-bit grid (straight-through rounding)."""
    s = step(bits)
    return s * round_ste(z / s)


@torch.no_grad()
def residuals(z: torch.Tensor, chain: Sequence[int]) -> list[torch.Tensor]:
    """[z₁, ε₂, ε₃, …]: the narrowest quantization of `z`, then what each wider width adds (no gradient).

    In a nested chain ε_k = D(z − z₁ − … − ε_{k−1}, s_k) equals D(z, s_k) − D(z, s_{k−1}), which is how it is
    computed here: one rounding per width, no chain of dependent passes."""
    levels = [quantize_unit(z, bits) for bits in chain]
    return levels[:1] + [levels[i] - levels[i - 1] for i in range(1, len(levels))]


def combine(parts: Sequence[torch.Tensor], gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """ẑ = z₁ + g₂(ε₂ + g₃(ε₃ + …)); `gates` has one entry per part after the first."""
    out = torch.zeros_like(parts[0])
    for part, gate in zip(reversed(parts[1:]), reversed(gates), strict=True):
        out = gate * (part + out)
    return parts[0] + out


def single_path(z: torch.Tensor, parts: Sequence[torch.Tensor], gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """`combine(parts, gates)` in value; the gradient passes straight through to `z` (and to the gates)."""
    return combine(parts, gates) + (z - z.detach())


def hard_gate(margin: torch.Tensor, temperature: float) -> torch.Tensor:
    """1[margin > 0] forward; gradient σ'(margin/τ)/τ (the sigmoid surrogate)."""
    soft = torch.sigmoid(margin / temperature)
    return (margin > 0).to(margin.dtype) + soft - soft.detach()


def expected_bits(chain: Sequence[int], gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bits the gates select: b₁ + g₂(b₂ − b₁) + g₂g₃(b₃ − b₂) + … (differentiable in the gates)."""
    total, opened = torch.tensor(float(chain[0])), torch.tensor(1.0)
    for i, gate in enumerate(gates, start=1):
        opened = opened * gate
        total = total + opened * (chain[i] - chain[i - 1])
    return total


@torch.no_grad()
def residual_statistic(parts: Sequence[torch.Tensor], chain: Sequence[int],
                       more: Sequence[Sequence[torch.Tensor]] = ()) -> list[torch.Tensor]:
    """For each wider width: the mean |residual| in units of the next narrower step (≈ 0.25 for spread values),
    over `parts` and the decompositions in `more` together (a group's layers)."""
    every = [parts, *more]
    return [sum(p[i].abs().sum() for p in every) / sum(p[i].numel() for p in every) / step(chain[i - 1])
            for i in range(1, len(parts))]


def chosen_bits(chain: Sequence[int], gates: Sequence[torch.Tensor]) -> int:
    """The width the (hard) gates select."""
    bits = chain[0]
    for i, gate in enumerate(gates, start=1):
        if float(gate.detach()) <= 0.5:
            break
        bits = chain[i]
    return bits


class Thresholds(nn.Module):
    """Learnable gate thresholds α (one per wider width); `frozen` detaches them (SBS alternates weight-gate and
    activation-gate updates).

    The first statistics seen set α = t − `start_margin`·τ, so every gate starts open by the same margin however
    its statistic is scaled (a ReLU output's residuals are smaller than a weight's: many values are 0).
    """

    def __init__(self, n: int, lr_scale: float, start_margin: float = 1.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n))
        self.alpha.lr_scale = lr_scale  # read by zerobit.train.loop.make_optimizer
        self.register_buffer("started", torch.tensor(False))
        self.start_margin = start_margin
        self.frozen = False

    @torch.no_grad()
    def start(self, stats: torch.Tensor, temperature: float) -> None:
        """Place the thresholds `start_margin` temperatures below `stats` (once)."""
        if not bool(self.started):
            self.alpha.copy_(stats.to(self.alpha) - self.start_margin * temperature)
            self.started.fill_(True)

    @torch.no_grad()
    def place(self, stats: torch.Tensor, margins: torch.Tensor, temperature: float) -> None:
        """Put each threshold `margins[i]` temperatures below its statistic."""
        self.alpha.copy_(stats.to(self.alpha) - margins.to(self.alpha) * temperature)
        self.started.fill_(True)

    def gates(self, stats: Sequence[torch.Tensor], temperature: float) -> list[torch.Tensor]:
        if stats:
            self.start(torch.stack([torch.as_tensor(t) for t in stats]), temperature)
        alpha = self.alpha.detach() if self.frozen else self.alpha
        return [hard_gate(t - alpha[i], temperature) for i, t in enumerate(stats)]

    def margins(self, stats: Sequence[torch.Tensor]) -> list[float]:
        return [float(t - self.alpha[i].detach()) for i, t in enumerate(stats)]


def prefix_tails(parts: Sequence[torch.Tensor], gates: Sequence[float]) -> list[torch.Tensor]:
    """∂ẑ/∂g_i for every gate: (g₂⋯g_{i−1})·(ε_i + g_{i+1}(ε_{i+1} + …))."""
    tails, out = [], torch.zeros_like(parts[0])
    for part, gate in zip(reversed(parts[1:]), reversed(gates), strict=True):
        tail = part + out
        tails.append(tail)
        out = gate * tail
    tails.reverse()
    prefix, grads = 1.0, []
    for i, tail in enumerate(tails):
        grads.append(prefix * tail)
        prefix = prefix * gates[i]
    return grads


class _SinglePathActivation(torch.autograd.Function):
    """An activation's single path in two passes over memory forward (the hard gates select one width, so ẑ is
    one rounding); the residuals the gates' gradients need are recomputed in the backward pass."""

    @staticmethod
    def forward(x: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, chain: tuple[int, ...],
                signed: bool, recorder: SBSAct | None = None) -> torch.Tensor:
        bits = chosen_bits(chain, list(gates))
        z = (torch.clamp(x / v, -1, 1) + 1) / 2 if signed else torch.clamp(x / v, 0, 1)
        zq = torch.round(z / step(bits)) * step(bits)
        return v * (2 * zq - 1) if signed else v * zq

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        x, v, gates, chain, signed, recorder = inputs
        ctx.save_for_backward(x, v, gates, output)
        ctx.chain, ctx.signed, ctx.recorder = chain, signed, recorder

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple:
        x, v, gates, out = ctx.saved_tensors
        u = x / v
        inside = (u > -1) & (u < 1) if ctx.signed else (u > 0) & (u < 1)
        grad_x = grad * inside
        grad_v = (grad * (out / v - u * inside)).sum()
        z = (torch.clamp(u, -1, 1) + 1) / 2 if ctx.signed else torch.clamp(u, 0, 1)
        with torch.no_grad():
            parts = residuals(z, ctx.chain)
        scale = 2 * v if ctx.signed else v
        tails = prefix_tails(parts, gates.tolist())
        grad_g = torch.stack([(grad * d).sum() * scale for d in tails]) if len(gates) else torch.zeros_like(gates)
        rec = ctx.recorder
        if rec is not None and rec.sensitivity is not None and len(gates):
            rec.sensitivity += torch.stack([((grad * d * scale).float() ** 2).sum() for d in tails])
        return grad_x, grad_v, grad_g, None, None, None


def _statistic_sample(x: torch.Tensor, n: int = 65536) -> torch.Tensor:
    """At most `n` evenly strided values of `x` (the gate statistic is a mean; a sample estimates it)."""
    flat = x.detach().reshape(-1)
    return flat if flat.numel() <= n else flat[:: flat.numel() // n]


class SBSAct(nn.Module):
    """Single-path quantizer of a layer's input activations, with its own gates (one per wider width)."""

    def __init__(self, chain: Sequence[int], range_: float, signed: bool, temperature: float,
                 lr_scale: float, start_margin: float = 1.0) -> None:
        super().__init__()
        self.chain = tuple(chain)
        self.v = nn.Parameter(torch.tensor(float(range_)))
        self.signed = bool(signed)
        self.temperature = temperature
        self.thresholds = Thresholds(len(chain) - 1, lr_scale, start_margin)
        self.gates: list[torch.Tensor] = []
        self.stats: list[torch.Tensor] = []
        self.sensitivity: torch.Tensor | None = None  # Σ (∂L/∂g_i per element)² while recording

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v.clamp_min(1e-8)
        with torch.no_grad():
            sample = _statistic_sample(x) / v
            z = (torch.clamp(sample, -1, 1) + 1) / 2 if self.signed else torch.clamp(sample, 0, 1)
            self.stats = residual_statistic(residuals(z, self.chain), self.chain)
        self.gates = self.thresholds.gates(self.stats, self.temperature)
        gates = torch.stack(self.gates) if self.gates else v.new_zeros(0)
        return _SinglePathActivation.apply(x, v.to(x.dtype), gates.to(x.dtype), self.chain, self.signed, self)

    def bits(self) -> torch.Tensor:
        return expected_bits(self.chain, self.gates)


class SBSLayer(WrapsLayer):
    """A Conv2d/Linear/Embedding (and its following BatchNorm) whose weights and inputs are single-path quantized.

    Its group's gates decide the weight width and which output channels stay (`set_weight` each step); its own
    `act` gates decide the input width (None: inputs are token ids, or activations stay as they are).
    """

    def __init__(self, layer: nn.Module, bn: nn.Module | None, chain: Sequence[int], act: SBSAct | None) -> None:
        super().__init__()
        self.layer, self.bn, self.act, self.chain = layer, bn, act, tuple(chain)
        w = layer.weight.detach()
        self.v = nn.Parameter(w.flatten(1).abs().amax(1).clamp_min(1e-8))
        self.weight_q: torch.Tensor | None = None
        self.cached_parts: list[torch.Tensor] | None = None  # kept while SBS measures sensitivities
        self.keep: torch.Tensor | None = None

    def weight_range(self) -> torch.Tensor:
        """The per-channel range v, shaped to broadcast over the weight."""
        return self.v.clamp_min(1e-8).view((-1,) + (1,) * (self.layer.weight.dim() - 1))

    def unit(self) -> torch.Tensor:
        """The weight mapped to [0, 1] by its per-channel range."""
        return (torch.clamp(self.layer.weight / self.weight_range(), -1, 1) + 1) / 2

    def set_weight(self, z: torch.Tensor, parts: list[torch.Tensor], gates: list[torch.Tensor],
                   keep: torch.Tensor | None) -> None:
        """The weight for the next forward passes: `z`'s single path under `gates`, channels kept by `keep`."""
        self.weight_q, self.keep = self.weight_range() * (2 * single_path(z, parts, gates) - 1), keep

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        y = layer_op(self.layer, x, self.weight_q, getattr(self.layer, "bias", None), *args, **kwargs)
        if self.bn is not None:
            y = self.bn(y)
        if self.keep is None or isinstance(self.layer, nn.Embedding):  # an Embedding's rows are tokens, not outputs
            return y
        return mask_channels(self.layer, y, self.keep.to(y.dtype))
