"""A LLaMA written by hand the way Meta's reference code writes it: no Hugging Face, no config object; the attention
keeps its head counts as `n_local_heads` / `n_local_kv_heads` / `n_rep`, rotates q and k as complex numbers and
repeats the k/v heads with `repeat_interleave` (a mapping Torch-Pruning divides by zero in)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotations(head_dim: int, positions: int) -> torch.Tensor:
    """e^(i·t·θ_k) for every position t and frequency θ_k = 10000^(-2k / head_dim)."""
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(positions).float(), theta)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim), its pairs of features rotated by `rot[:T]`."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rot[:x.shape[1]].view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads = heads, kv_heads
        self.n_rep, self.head_dim = heads // kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = rotate(self.wq(x).view(b, t, self.n_local_heads, self.head_dim), rot)
        k = rotate(self.wk(x).view(b, t, self.n_local_kv_heads, self.head_dim), rot)
        v = self.wv(x).view(b, t, self.n_local_kv_heads, self.head_dim)
        k, v = (torch.repeat_interleave(z, self.n_rep, dim=2).transpose(1, 2) for z in (k, v))
        scores = q.transpose(1, 2) @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        causal = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        out = F.softmax(scores + causal, dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, heads, kv_heads)
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rot)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class HandLlama(nn.Module):
    """Token ids (B, T) → logits (B, T, vocab)."""

    def __init__(self, vocab: int = 60, dim: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 positions: int = 32) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("rot", rotations(dim // heads, positions), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rot)
        return self.output(self.norm(h))
