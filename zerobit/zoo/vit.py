"""A small vision transformer for 28x28 Fashion-MNIST: 7x7 patches (16 tokens + a class token), pre-norm blocks.

Written the way people write ViTs (nanoGPT/timm style): the attention module keeps `num_heads` and `head_dim` and
reshapes its q/k/v projections to (B, heads, T, head_dim), so zerobit decides its channels head by head and
updates `num_heads` when heads are removed (zerobit.graph.heads).

Example:
    >>> ViT()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5  # fixed: removing heads leaves each head's size unchanged
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)  # (B, H, T, T)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, -1))  # (B, T, H*d) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Patch embedding (a 7x7 stride-7 conv), class token, learned positions, `depth` blocks, linear head."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, patch: int = 7,
                 image: int = 28, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, C)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, 17, C)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int = 10) -> ViT:
    """Build a randomly initialized small ViT (~140k parameters).

    Example:
        >>> sum(p.numel() for p in vit().parameters()) < 200_000
        True
    """
    return ViT(num_classes=num_classes)
