"""PyTorch's own attention (nn.MultiheadAttention, inside nn.TransformerEncoderLayer / DecoderLayer) as Linears.

nn.MultiheadAttention keeps its q, k and v projections in one Parameter (`in_proj_weight`, 3E × E) that it
multiplies inside F.multi_head_attention_forward: no layer to quantize or prune, so the largest tensors of a
transformer written with torch.nn stayed float32 and a small budget could not be met. zerobit works on a copy of
such a model in which each one is a `LinearMultiheadAttention`: q_proj, k_proj, v_proj (the thirds of
in_proj_weight, or q/k/v_proj_weight) and the same out_proj, computing the same outputs, with the same call
signature and return value. Its heads are then coupled and removed like BERT's (zerobit.graph.heads: `num_heads`,
`head_dim`). The transformer layers' fused fast path, which reads in_proj_weight, is switched off on the copy
(nested tensors too). Left as they are: attention with `add_bias_kv` or `add_zero_attn`. Files written before
.zbit version 6 hold the original module (in_proj_weight a float tensor) and load so.

A 3-D `attn_mask` (one per batch × head) keeps working only while the heads are all kept.

Example:
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> lin = LinearMultiheadAttention(mha).eval()
    >>> x = torch.randn(1, 5, 8)
    >>> torch.allclose(lin(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with its q, k and v projections as three nn.Linear (see the module docstring)."""

    in_proj_weight = None  # what the transformer layers' fast path looks for: absent, the layers take the plain path
    in_proj_bias = None
    _qkv_same_embed_dim = False
    head_projections = ("q_proj", "k_proj", "v_proj")  # out_proj's rows are as wide, but not heads (graph.heads)

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        weights = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else \
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (T, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, s = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, b, t, s, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
            weights = F.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p) @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, -1))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool, b: int,
                   t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The attention and key-padding masks as one float mask added to the scores (True: not attended, −inf)."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=device).triu(1)
    masks = []
    if attn_mask is not None:
        mask = _as_float(attn_mask, dtype)
        masks.append(mask.view(b, -1, t, s) if mask.dim() == 3 else mask)
    if key_padding_mask is not None:
        masks.append(_as_float(key_padding_mask, dtype).view(b, 1, 1, s))
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] + masks[1]


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def convertible(module: nn.Module) -> bool:
    """An nn.MultiheadAttention that `LinearMultiheadAttention` computes exactly."""
    return isinstance(module, nn.MultiheadAttention) and module.bias_k is None and not module.add_zero_attn


def unfuse_attention_(model: nn.Module) -> nn.Module:
    """Swap every convertible nn.MultiheadAttention of `model` for a LinearMultiheadAttention, in place, and switch
    off the fast paths of the transformer layers that held them; returns `model`."""
    swaps = [(name, m) for name, m in model.named_modules() if name and convertible(m)]
    for name, module in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, LinearMultiheadAttention(module))
    if swaps:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False  # the nested-tensor path reads in_proj_weight
    return model


def rejoin_attention(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (of `model`) with each LinearMultiheadAttention's q, k and v tensors joined into the in_proj
    tensors nn.MultiheadAttention holds, so sizes taken from it are the original model's."""
    state = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, LinearMultiheadAttention):
            for kind in ("weight", "bias"):
                keys = [f"{name}.{p}_proj.{kind}" for p in "qkv"]
                if all(k in state for k in keys):
                    state[f"{name}.in_proj_{kind}"] = torch.cat([state.pop(k) for k in keys])
    return state
