"""Fake-quant layers: a Conv2d/Linear (with its BatchNorm folded in at eval time) at per-channel bits.

Training mode: weights are fake-quantized with a straight-through estimator and the BatchNorm uses batch
statistics. Eval mode computes exactly what the .zbit file stores: integer codes times a float16 per-channel
scale with the BatchNorm folded in, and a float16 bias (behind quantized inputs, rounded to the accumulator's
step as integer runtimes add it: `grid_bias`) — so the exported model's outputs equal these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from zerobit.quant.codebook import nearest
from zerobit.quant.uniform import (
    FLOAT_BITS,
    best_clip,
    codes,
    fake_quant,
    fake_quant_activation,
    learned_quant,
    learned_quant_activation,
    scales,
)


class ActQuant(nn.Module):
    """Per-tensor activation quantizer; `scale` is calibrated once (then fixed, or learned after `learn_scale`),
    `signed` from the data's sign."""

    def __init__(self, bits: int, scale: float = 1.0, signed: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("signed", torch.tensor(bool(signed)))

    def learn_scale(self) -> None:
        """Train the step with the weights (LSQ), as its logarithm `log_scale` (updates are relative, the step
        stays positive); `scale` follows it (`sync`) and stays what files store."""
        if self.bits < FLOAT_BITS and getattr(self, "log_scale", None) is None:
            self.log_scale = nn.Parameter(self.scale.detach().clamp_min(1e-12).log())

    @torch.no_grad()
    def sync(self) -> None:
        """Set `scale` from the learned `log_scale` (after each optimiser step)."""
        if getattr(self, "log_scale", None) is not None:
            self.scale.copy_(self.log_scale.exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= FLOAT_BITS:
            return x
        if getattr(self, "log_scale", None) is not None and torch.is_grad_enabled():
            return learned_quant_activation(x, self.bits, self.log_scale.exp(), bool(self.signed))
        return fake_quant_activation(x, self.bits, self.scale, bool(self.signed))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}, signed={bool(self.signed)}"


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]),) + tuple(args[1:])


def attach_input_quant(module: nn.Module, quant: ActQuant) -> None:
    """Quantize `module`'s input with `quant` without wrapping it (the module keeps its class and attributes)."""
    module.add_module("input_quant", quant)
    module.register_forward_pre_hook(_quantize_input)


@dataclass
class DeployTensors:
    """What one layer stores: codes per kept channel, float16 scales and bias, float weights where bits=32."""

    codes: torch.Tensor  # (C, ...) integer-valued float (codebook layers: centroid index)
    scale: torch.Tensor  # (C,) float16 (codebook layers: the folded BatchNorm multiplier)
    bias: torch.Tensor | None  # (C,) float16
    weight: torch.Tensor  # (C, ...) float32: the folded, dequantized weight used at inference
    book: torch.Tensor | None = None  # (2^b,) float16 centroids of a codebook layer


STANDARD_FORWARDS = (nn.Linear.forward, nn.Embedding.forward, nn.Conv2d.forward)


def layer_op(layer: nn.Conv2d | nn.Linear | nn.Embedding, x: torch.Tensor, w: torch.Tensor,
             b: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What `layer` computes on `x` (and any further arguments its forward takes), with weight `w` and bias `b`
    in place of its own. A subclass with its own forward (OPT's positional embedding takes the attention mask and
    `position_ids`) runs that forward on the substituted tensors."""
    if type(layer).forward not in STANDARD_FORWARDS:
        tensors = {"weight": w} if getattr(layer, "bias", None) is None else {"weight": w, "bias": b}
        return functional_call(layer, tensors, (x, *args), kwargs)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(layer, nn.Embedding):
        e = layer
        return F.embedding(x, w, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def grid_bias(bias: torch.Tensor, in_scale: torch.Tensor | float, w_scale: torch.Tensor) -> torch.Tensor:
    """The bias an integer runtime adds to a layer with quantized inputs and integer weights: a whole number of
    accumulator steps (input scale × each output channel's weight scale), as ONNX QLinearConv / QGemm hold it in
    int32. onnxruntime rounds a float bias so when it fuses such a layer; the model rounds it the same way, so both
    compute the same numbers. Channels without a scale (removed, float) keep their bias."""
    step = torch.as_tensor(in_scale, dtype=torch.float32, device=bias.device) * w_scale.float()
    return torch.where(step > 0, torch.round(bias.float() / step) * step, bias.float())


def step_of_every_channel(scale16: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Per-channel float16 steps where no quantized channel has a step of 0: a channel whose weights are all zero
    (unstructured sparsity can empty one layer's channel) takes the layer's smallest step (1 when none has one).
    Its codes are 0, so its weights stay 0; but integer runtimes quantize a layer's bias with each channel's
    weight step, and a step of 0 made onnxruntime's fused kernels compute garbage."""
    zero = (scale16 == 0) & (bits > 0) & (bits != FLOAT_BITS)
    if not bool(zero.any()):
        return scale16
    steps = scale16.abs()[scale16 != 0]
    fill = steps.min() if steps.numel() else torch.tensor(1.0, dtype=scale16.dtype, device=scale16.device)
    return torch.where(zero, fill, scale16)


def mask_channels(layer: nn.Module, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`layer`'s output `y` with output channel c multiplied by keep[c] (channels last for a Linear: (B, C),
    (B, T, C); dim 1 for a convolution)."""
    if isinstance(layer, nn.Linear):
        return y * keep
    return y * keep.view((1, -1) + (1,) * (y.dim() - 2))


class WrapsLayer(nn.Module):
    """Base of modules that wrap a layer as `self.layer`: the wrapped layer's attributes (stride, out_channels, …)
    stay readable, for model code that reads them."""

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None or name.startswith("__"):
                raise
            return getattr(layer, name)


class QuantLayer(WrapsLayer):
    """A Conv2d, Linear or Embedding, its optional following BatchNorm2d, per-channel weight bits (an Embedding's
    channels are its rows) and input quantizer (float for an Embedding: its inputs are token ids)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear | nn.Embedding, bn: nn.BatchNorm2d | None, bits: list[int],
                 act_bits: int) -> None:
        super().__init__()
        if len(bits) != layer.weight.shape[0]:
            raise ValueError(f"{len(bits)} bit-widths for a layer with {layer.weight.shape[0]} output channels")
        self.layer = layer
        self.bn = bn
        self.act = ActQuant(FLOAT_BITS if isinstance(layer, nn.Embedding) else act_bits).to(layer.weight.device)
        self.register_buffer("bits", torch.tensor(bits, dtype=torch.int64, device=layer.weight.device))
        self.register_buffer("clip", best_clip(layer.weight, self.bits))
        self.register_buffer("mask", None)  # 1 = weight kept (unstructured sparsity)
        self.register_buffer("fixed_scale", None)  # frozen per-channel steps
        self.register_buffer("book", None)  # sorted codebook centroids
        self.log_step: nn.Parameter | None = None  # log of the learned per-channel steps (after `learn_steps`)
        self._owner: QuantLayer | None = None  # the layer whose weight this one shares (see `tie_to`)

    @property
    def owner(self) -> QuantLayer | None:
        """The QuantLayer whose (tied) weight this layer uses, quantized by that layer; None when it owns one."""
        return self.__dict__.get("_owner")

    def tie_to(self, owner: QuantLayer) -> None:
        """Use `owner`'s weight as `owner` quantizes it (tied weights: GPT-2's lm_head and token embedding). The
        weight, its bits, steps, mask and codebook are then the owner's; this layer keeps its bias and input
        quantizer. `owner` is not a submodule of this one (its state is saved once, where it lives)."""
        if owner.layer.weight.shape != self.layer.weight.shape or owner.bn is not None or self.bn is not None:
            raise ValueError("only layers with one weight shape and no folded BatchNorm can share a weight")
        self.layer.weight = owner.layer.weight
        object.__setattr__(self, "_owner", owner)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, for model code that reads it itself (``F.linear(h, wte.weight)``,
        an output projection tied to its embedding by hand): fake-quantized in training (gradients pass straight
        through), in eval what the file decodes to, so the model measured is the model written. (The float
        weight being trained is `layer.weight`.)"""
        if self.training or self.bn is not None:
            return self._quantized_weight()
        return self.deploy().weight

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Fix which weights are kept (None = all)."""
        self.mask = None if mask is None else mask.to(self.layer.weight.dtype).clone()

    def freeze_scales(self) -> None:
        """Fix the per-channel step sizes at their current values (OPQ fine-tunes with frozen steps)."""
        if self.owner is not None:
            return
        self.fixed_scale = scales(self.masked_weight(), self.bits, self.clip).detach().clone()

    def learn_steps(self) -> None:
        """Train the per-channel steps with the weights (LSQ, as logarithms: relative updates, always positive),
        starting from the current ones (codebook layers keep their centroids)."""
        if self.book is None and self.log_step is None and self.owner is None:
            self.log_step = nn.Parameter(self._current_scale().detach().clamp_min(1e-12).log())

    def _current_scale(self) -> torch.Tensor:
        if self.log_step is not None:
            return self.log_step.detach().exp()
        if self.fixed_scale is not None:
            return self.fixed_scale
        return scales(self.masked_weight(), self.bits, self.clip)

    def set_codebook(self, centroids: torch.Tensor | None) -> None:
        """Quantize weights to the nearest of these centroids (sorted) instead of a uniform grid."""
        self.book = None if centroids is None else torch.sort(centroids.detach().float()).values

    def masked_weight(self) -> torch.Tensor:
        w = self.layer.weight
        return w if self.mask is None else w * self.mask

    def _quantized_weight(self) -> torch.Tensor:
        if self.owner is not None:
            return self.owner._quantized_weight()
        w = self.masked_weight()
        if self.log_step is not None:
            wq = learned_quant(w, self.bits, self.log_step.exp())
            return wq if self.mask is None else wq * self.mask
        if self.book is None:
            wq = fake_quant(w, self.bits, self.clip, self.fixed_scale)
        else:
            wq = self.book[nearest(w.detach(), self.book)]
        if self.mask is not None:
            wq = wq * self.mask
        return w + (wq - w).detach()

    def set_bits(self, bits: list[int]) -> None:
        """Change the bit-width of each channel (and re-pick the clip ratios and learned steps)."""
        self.bits.copy_(torch.tensor(bits, dtype=torch.int64, device=self.bits.device))
        self.clip.copy_(best_clip(self.layer.weight, self.bits))
        if self.log_step is not None:
            with torch.no_grad():
                self.log_step.copy_(scales(self.masked_weight(), self.bits, self.clip).log())


    def _keep_mask(self, y: torch.Tensor) -> torch.Tensor:
        if bool((self.bits > 0).all()):
            return y
        return mask_channels(self.layer, y, (self.bits > 0).to(y.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.act(x)
        if not self.training:
            d = self.deploy()
            bias = d.bias.float() if d.bias is not None else None
            if bias is not None and self.act.bits < FLOAT_BITS and d.book is None and \
                    not bool((self.bits == FLOAT_BITS).any()):
                bias = grid_bias(bias, self.act.scale, d.scale)
            return self._keep_mask(layer_op(self.layer, x, d.weight, bias, *args, **kwargs))
        y = layer_op(self.layer, x, self._quantized_weight(), getattr(self.layer, "bias", None), *args, **kwargs)
        if self.bn is not None:
            y = self.bn(y)
        return self._keep_mask(y)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-channel multiplier and shift of the BatchNorm (running statistics) and layer bias."""
        w, bias = self.layer.weight, getattr(self.layer, "bias", None)
        if self.bn is None:
            return torch.ones(w.shape[0], device=w.device), bias
        bn = self.bn
        mult = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * mult
        if bias is not None:
            shift = shift + mult * bias
        return mult, shift

    @torch.no_grad()
    def deploy(self) -> DeployTensors:
        """The tensors the exported file holds, and the weight they decode to."""
        if self.owner is not None:  # the owner's stored weight, this layer's own bias
            bias = getattr(self.layer, "bias", None)
            return replace(self.owner.deploy(), bias=bias.detach().to(torch.float16) if bias is not None else None)
        w = self.masked_weight().detach()
        mult, shift = self._fold()
        shape = (-1,) + (1,) * (w.dim() - 1)
        bias16 = shift.detach().to(torch.float16) if shift is not None else None
        if self.book is not None:
            book16 = self.book.to(torch.float16)
            idx = nearest(w, self.book)
            scale16 = mult.detach().to(torch.float16)
            weight = book16.float()[idx] * scale16.float().view(shape)
            if self.mask is not None:
                weight = weight * self.mask
            return DeployTensors(idx.float(), scale16, bias16, weight.contiguous(), book16)
        s = self._current_scale()
        c = codes(w, self.bits, s)
        scale16 = step_of_every_channel((s * mult).to(torch.float16), self.bits)
        quantized = c * scale16.float().view(shape)
        is_float = (self.bits == FLOAT_BITS).view(shape)
        weight = torch.where(is_float, w * mult.view(shape), quantized)
        return DeployTensors(c, scale16, bias16, weight.contiguous())

    def non_finite_parts(self) -> list[str]:
        """Which stored numbers are NaN or infinite ("weights", "scales", "bias", "codebook", "input scale")."""
        d = self.deploy()
        parts = {"weights": d.weight, "scales": d.scale, "bias": d.bias, "codebook": d.book}
        bad = [part for part, t in parts.items() if t is not None and not bool(torch.isfinite(t).all())]
        if self.act.bits < FLOAT_BITS and not 0 < float(self.act.scale) < float("inf"):
            bad.append("input scale")
        return bad

    def extra_repr(self) -> str:
        kept = int((self.bits > 0).sum())
        return f"kept={kept}/{len(self.bits)}, bits={sorted(set(self.bits.tolist()))}"
