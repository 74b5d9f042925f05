"""Per-channel symmetric uniform quantization with a straight-through estimator.

A channel with b bits uses the 2^b − 1 integer levels −(2^(b−1)−1) … 2^(b−1)−1 (symmetric, so 2 bits is
ternary) and one scale s = clip·max|w| / (2^(b−1)−1). 0 bits zeroes the channel; 32 bits leaves it in float.
"""

from __future__ import annotations

import torch

FLOAT_BITS = 32
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def qmax(bits: torch.Tensor) -> torch.Tensor:
    """Largest code magnitude per channel (1 for 0/32 bits, which never use it)."""
    quantized = (bits > 0) & (bits < FLOAT_BITS)
    return torch.where(quantized, 2.0 ** (bits.float() - 1) - 1, torch.ones_like(bits, dtype=torch.float32))


def _per_channel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (w.dim() - 1)))


def scales(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Step size of every output channel of `w` (C, ...)."""
    amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    if clip is not None:
        amax = amax * clip
    return amax / qmax(bits)


def codes(w: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float) of `w`; zero for 0-bit channels, meaningless for float channels."""
    q = _per_channel(qmax(bits), w)
    c = torch.clamp(torch.round(w / _per_channel(scale, w)), -q, q)
    return c * _per_channel((bits > 0).float(), w)


def fake_quant(w: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor | None = None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `w` per output channel; gradients pass straight through.

    `scale` fixes the per-channel steps (otherwise they follow max|w|·clip).

    Example:
        >>> w = torch.randn(4, 3)
        >>> fake_quant(w, torch.tensor([8, 4, 0, 32])).shape
        torch.Size([4, 3])
    """
    s = scales(w, bits, clip) if scale is None else scale
    wq = codes(w, bits, s) * _per_channel(s, w)
    is_float = _per_channel((bits == FLOAT_BITS).float(), w)
    wq = wq * (1 - is_float) + w.detach() * is_float
    return w + (wq - w).detach()


def _scale_grad(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """`x` in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    return (x - x * factor).detach() + x * factor


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded; the gradient passes straight through."""
    return (x.round() - x).detach() + x


def learned_quant(w: torch.Tensor, bits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `w` per output channel with learnable steps (LSQ, Esser et al. 2020).

    Rounding passes gradients straight through; the steps get LSQ's gradient, scaled by 1/sqrt(n·Q) (n weights
    per channel, Q the largest code) so they learn at the pace of the weights. 0-bit channels give zeros, 32-bit
    channels their float weights.
    """
    q = _per_channel(qmax(bits), w)
    grad_factor = 1.0 / torch.sqrt(q * w[0].numel())
    s = _per_channel(_scale_grad(step.clamp_min(1e-12), grad_factor.flatten()), w)
    wq = round_ste(torch.clamp(w / s, -q, q)) * s * _per_channel((bits > 0).float(), w)
    is_float = _per_channel(bits == FLOAT_BITS, w)
    return torch.where(is_float, w, wq)


def learned_quant_activation(x: torch.Tensor, bits: int, step: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per-tensor activation quantization with a learnable step (LSQ); see `learned_quant`."""
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    lo = -hi if signed else 0
    s = _scale_grad(step.clamp_min(1e-12), 1.0 / (x[0].numel() * hi) ** 0.5)
    return round_ste(torch.clamp(x / s, lo, hi)) * s


def best_clip(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Per-channel clip ratio from CLIP_GRID that minimises the squared quantization error."""
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = torch.ones(w.shape[0], device=w.device)
    w = w.detach()
    for ratio in CLIP_GRID:
        clip = torch.full((w.shape[0],), ratio, device=w.device)
        s = scales(w, bits, clip)
        err = (codes(w, bits, s) * _per_channel(s, w) - w).pow(2).flatten(1).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return torch.where((bits > 0) & (bits < FLOAT_BITS), best, torch.ones_like(best))


def fake_quant_activation(x: torch.Tensor, bits: int, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per-tensor activation quantization (unsigned after ReLUs, signed otherwise) with STE."""
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    lo = -hi if signed else 0
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: the same values, in place (≈3× faster)
        return torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)
    return _StraightThrough.apply(x, scale, lo, hi)


class _StraightThrough(torch.autograd.Function):
    """Quantize-dequantize in the forward pass (in place on one new tensor); the gradient passes unchanged."""

    @staticmethod
    def forward(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return torch.div(x, scale).round_().clamp_(lo, hi).mul_(scale)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple:
        return grad, None, None, None
