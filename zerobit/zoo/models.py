"""Model definitions for 1x28x28 inputs and 10 classes (Fashion-MNIST).

Design rules shared by every model, relied upon by the compression code:

* every ``nn.Conv2d`` (``bias=False``) feeds directly into an ``nn.BatchNorm2d`` (BN folding);
* activations, residual additions and flattening are ``nn.Module`` instances, none in-place;
* the head is ``nn.AdaptiveAvgPool2d(1)`` -> ``nn.Flatten`` -> ``nn.Linear``, and that final Linear is
  the last module in ``model.modules()`` order;
* everything traces with ``torch.fx.symbolic_trace`` and Torch-Pruning's ``DependencyGraph``.

Example:
    >>> model = resnet20()
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Add(nn.Module):
    """Element-wise sum of two tensors as a module (a visible node for graph tools).

    Example:
        >>> Add()(torch.ones(2), torch.ones(2)).tolist()
        [2.0, 2.0]
    """

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Return ``[Conv2d(bias=False), BatchNorm2d]`` with 'same' padding for odd kernels."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut (option B)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels), ~0.27M parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, widths[0], 3, 1)
        self.relu = nn.ReLU()
        cin, stages = widths[0], []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class VGG(nn.Module):
    """Small VGG: 3x3 conv+BN+ReLU stacks with 2x2 max-pooling, global average pool, linear head."""

    def __init__(self, cfg: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, 128, "M"),
                 in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(cin, int(item), 3, 1), nn.ReLU()]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t=1), 3x3 depthwise, linear 1x1 project, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout
        self.add = Add() if self.use_residual else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.add is not None:
            out = self.add(out, x)
        return out


# (expansion t, channels c, blocks n, stride s). Compared with the classic small-input setting
# (1,16,1,1),(6,24,2,2),(6,32,3,2),(6,64,2,1), the first block downsamples (so no 96-channel expansion
# runs at 28x28) and t=4: ~1.7x less activation traffic, which is what bounds MobileNet speed on CPU.
MBV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 2, 1))


class MobileNetV2(nn.Module):
    """Small MobileNetV2 for 28x28 inputs: 3x3 stem, inverted residuals at 14x14 and 7x7, 1x1 conv to 256."""

    def __init__(self, settings: Sequence[tuple[int, int, int, int]] = MBV2_SETTINGS, stem: int = 16,
                 last: int = 256, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, stem, 3, 1), nn.ReLU6())
        blocks: list[nn.Module] = []
        cin = stem
        for t, c, n, s in settings:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(cin, last, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10) -> ResNet20:
    """Build a randomly initialized ResNet-20.

    Example:
        >>> sum(p.numel() for p in resnet20().parameters()) > 250_000
        True
    """
    return ResNet20(num_classes=num_classes)


def vgg(num_classes: int = 10) -> VGG:
    """Build a randomly initialized small VGG.

    Example:
        >>> vgg()(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return VGG(num_classes=num_classes)


def mobilenetv2(num_classes: int = 10) -> MobileNetV2:
    """Build a randomly initialized small MobileNetV2.

    Example:
        >>> mobilenetv2()(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return MobileNetV2(num_classes=num_classes)
