"""Transposed linears (GPT-2's `Conv1D`) as nn.Linear, so they are traced, quantized and pruned like any Linear.

Hugging Face's `transformers.pytorch_utils.Conv1D` (GPT-2, GPT, DistilGPT-2, …) computes y = x·W + b with W
stored as (in, out): an nn.Linear whose weight is Wᵀ gives the same outputs. `compress` and `load` work on a
copy of the model in which every such layer is swapped for that nn.Linear, so the compressed model holds
nn.Linear where the original held Conv1D (the original is not changed). Any module class named `Conv1D` with a
2-D `weight` of shape (nx, nf) and attributes `nx`, `nf` is taken for one.

Example:
    >>> class Conv1D(nn.Module):  # the shape of transformers' class
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.nx = nf, nx
    ...         self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))
    >>> m = linearized(nn.Sequential(Conv1D(3, 2)))
    >>> type(m[0]).__name__, tuple(m[0].weight.shape)
    ('Linear', (3, 2))
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from zerobit.graph.fused import fused_projections, split_fused_
from zerobit.graph.mha import convertible, unfuse_attention_

TRANSPOSED_LINEARS = ("Conv1D",)


def is_transposed_linear(module: nn.Module) -> bool:
    """True for a GPT-2-style Conv1D: weight (nx, nf), y = x·W + b."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ in TRANSPOSED_LINEARS and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def _as_linear(module: nn.Module) -> nn.Linear:
    bias = getattr(module, "bias", None)
    weight = module.weight
    linear = nn.Linear(module.nx, module.nf, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.train(module.training)
    return linear


def linearize_(model: nn.Module, split: bool = True, attention: bool = True) -> nn.Module:
    """Swap every transposed linear of `model` for an equal nn.Linear, (`split`) every fused q/k/v projection for a
    FusedLinear (zerobit.graph.fused) and (`attention`) every nn.MultiheadAttention for a LinearMultiheadAttention
    (zerobit.graph.mha), in place; returns `model`."""
    swaps = [(name, m) for name, m in model.named_modules() if name and is_transposed_linear(m)]
    for name, module in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _as_linear(module))
    if attention:
        unfuse_attention_(model)
    return split_fused_(model) if split else model


def linearized(model: nn.Module, split: bool = True, attention: bool = True) -> nn.Module:
    """The model zerobit works on: `model` itself when it has no transposed linears, no fused q/k/v projections
    (`split`), no nn.MultiheadAttention (`attention`) and all its floating-point tensors are float32; else a copy
    with each swapped as `linearize_` does, in float32.

    A model loaded in bfloat16/float16 is compressed and measured in float32, and `load` returns it in float32:
    dequantized weights (codes × float16 scales) are exact in float32, not in bfloat16.
    """
    tensors = [*model.parameters(), *model.buffers()]
    low = any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors)
    swapped = any(is_transposed_linear(m) or (attention and convertible(m)) for m in model.modules())
    if not low and not swapped and not (split and fused_projections(model)):
        return model
    copied = linearize_(copy.deepcopy(model), split, attention)
    return copied.float() if low else copied
