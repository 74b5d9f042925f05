"""Tiny models on 1×8×8 digits images, covering every coupling the graph must handle."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class TinyPlain(nn.Module):
    """conv → conv → pool → linear: no coupling beyond consecutive layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 12), conv_bn(12, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyResidual(nn.Module):
    """Two residual blocks sharing one coupled group through the adds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 8)
        self.a1 = nn.Sequential(conv_bn(8, 8), nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.a2 = nn.Sequential(conv_bn(8, 8), nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu1(x + self.a1(x))
        x = self.relu2(x + self.a2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyDepthwise(nn.Module):
    """Inverted residual: 1×1 expand → 3×3 depthwise → 1×1 project, plus a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 8)
        self.expand = conv_bn(8, 24, k=1)
        self.dw = conv_bn(24, 24, groups=24)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyConcat(nn.Module):
    """Two branches concatenated along channels, then a 1×1 conv and a flatten (no pooling) head."""

    def __init__(self) -> None:
        super().__init__()
        self.left = conv_bn(1, 6)
        self.right = conv_bn(1, 10)
        self.merge = conv_bn(16, 8, stride=2, k=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc(torch.flatten(self.merge(x), 1))


TINY_MODELS = {"plain": TinyPlain, "residual": TinyResidual, "depthwise": TinyDepthwise, "concat": TinyConcat}
EXAMPLE = torch.zeros(1, 1, 8, 8)


class TinyLayerNorm(nn.Module):
    """ConvNeXt-style block: depthwise conv, LayerNorm and Linears on (B, H, W, C), a learned layer-scale."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1)
        self.dw = nn.Conv2d(width, width, 3, 1, 1, groups=width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C, H, W)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(y))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean(dim=(2, 3))))


TINY_MODELS["layernorm"] = TinyLayerNorm
