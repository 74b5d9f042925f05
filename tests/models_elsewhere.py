"""Tiny models written elsewhere (Hugging Face `transformers`, common hand-written idioms) for the zerobit matrix.

Every builder takes a seed and returns ``(model in eval mode, example input (1, C, H, W), number of classes)``;
building twice with the same seed gives the same weights, so a fresh copy can be handed to `zerobit.load`.
Models stay small (a few thousand to ~50k parameters) so a compress with no fine-tuning takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Built = tuple[nn.Module, torch.Tensor, int]
NUM_CLASSES = 10


class Logits(nn.Module):
    """A Hugging Face image classifier whose forward returns the logits tensor (zerobit expects a tensor)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.net = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def _perturb_norms(model: nn.Module) -> None:
    """Random BatchNorm statistics/affine and LayerNorm affine, so normalization layers matter in the outputs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _finish(model: nn.Module, shape: tuple[int, ...]) -> Built:
    with torch.no_grad():
        _perturb_norms(model)
    return model.eval(), torch.randn(*shape), NUM_CLASSES


# --------------------------------------------------------------------------------------------- transformers


def hf_resnet(seed: int = 0) -> Built:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 24, 40], depths=[1, 1, 1],
                       layer_type="basic", num_labels=NUM_CLASSES)
    return _finish(Logits(ResNetForImageClassification(cfg)), (1, 3, 32, 32))


def hf_convnext(seed: int = 0) -> Built:
    """LayerNorm inside a CNN, Linear layers on (B, H, W, C), a learned layer-scale vector per block."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    cfg = ConvNextConfig(num_channels=1, patch_size=2, num_stages=2, hidden_sizes=[24, 48], depths=[1, 1],
                         num_labels=NUM_CLASSES, drop_path_rate=0.0, layer_scale_init_value=1.0)
    model = Logits(ConvNextForImageClassification(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                p.uniform_(0.5, 1.5)
    return _finish(model, (1, 1, 32, 32))


def hf_mobilenet_v2(seed: int = 0) -> Built:
    """Depthwise convs, inverted residuals, TF-style dynamic padding (F.pad in forward)."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(seed)
    cfg = MobileNetV2Config(num_channels=1, image_size=32, depth_multiplier=0.15, depth_divisible_by=4, min_depth=4,
                            expand_ratio=2.0, finegrained_output=False, num_labels=NUM_CLASSES,
                            classifier_dropout_prob=0.0)
    return _finish(Logits(MobileNetV2ForImageClassification(cfg)), (1, 1, 32, 32))


def hf_regnet(seed: int = 0) -> Built:
    """Grouped (not depthwise) 3×3 convs and squeeze-excitation."""
    from transformers import RegNetConfig, RegNetForImageClassification

    torch.manual_seed(seed)
    cfg = RegNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], groups_width=8,
                       num_labels=NUM_CLASSES)
    return _finish(Logits(RegNetForImageClassification(cfg)), (1, 3, 32, 32))


def hf_efficientnet(seed: int = 0) -> Built:
    """MBConv with squeeze-excitation (a channel-wise multiply by a computed gate), depthwise convs."""
    from transformers import EfficientNetConfig, EfficientNetForImageClassification
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    torch.manual_seed(seed)
    kw = dict(num_channels=1, image_size=32, width_coefficient=0.6, depth_coefficient=0.1, depth_divisor=4,
              kernel_sizes=[3, 3, 3], in_channels=[32, 16, 24], out_channels=[16, 24, 40], depthwise_padding=[],
              strides=[1, 2, 2], num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6],
              num_labels=NUM_CLASSES, dropout_rate=0.0, drop_connect_rate=0.0)
    cfg = EfficientNetConfig(**kw, hidden_dim=8)
    cfg.hidden_dim = round_filters(cfg, 1280)  # top_bn is built with hidden_dim, top_conv with round_filters(1280)
    return _finish(Logits(EfficientNetForImageClassification(cfg)), (1, 1, 32, 32))


# --------------------------------------------------------------------------------------------- hand-written


def conv_bn(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class FunctionalNet(nn.Module):
    """Activations, pooling and flatten as function calls in forward (no nn.ReLU/nn.Flatten modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = conv_bn(1, 16)
        self.c2 = conv_bn(16, 32, stride=2)
        self.c3 = conv_bn(32, 48, stride=2)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class ReusedNet(nn.Module):
    """One block applied twice in forward (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.block = conv_bn(32, 32)
        self.down = conv_bn(32, 48, stride=2)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.block(x))
        x = F.relu(self.block(x))  # the same module again
        x = F.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


class AttrNet(nn.Module):
    """forward reads submodule attributes: conv.stride (TF-style "same" padding), conv.out_channels, fc.in_features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.conv = nn.Conv2d(32, 48, 3, 2, 0, bias=False)
        self.bn = nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.conv.stride[0] > 1:  # idiom: pad right/bottom for a strided conv, as TF "same" padding does
            x = F.pad(x, (0, 1, 0, 1))
        else:
            x = F.pad(x, (1, 1, 1, 1))
        x = F.relu(self.bn(self.conv(x)))
        x = x.mean((2, 3)).reshape(-1, self.conv.out_channels)
        return self.fc(x.view(-1, self.fc.in_features))


class SpatialGateNet(nn.Module):
    """CBAM-style spatial attention: a gate computed from the channel mean/max multiplies every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.gate = nn.Conv2d(2, 1, 7, 1, 3)
        self.down = conv_bn(32, 48, stride=2)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)  # (B, 2, H, W)
        x = x * torch.sigmoid(self.gate(pooled))  # (B, 32, H, W) * (B, 1, H, W)
        x = F.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    """Grouped convolutions (groups=2 and 4), not depthwise, around plain convs that can lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.g2 = conv_bn(32, 32, groups=2)
        self.mid = conv_bn(32, 48)
        self.wide = conv_bn(48, 32)
        self.g4 = conv_bn(32, 64, stride=2, groups=4)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.g2(x))
        x = F.relu(self.wide(F.relu(self.mid(x))))
        x = F.relu(self.g4(x))
        return self.fc(x.mean((2, 3)))


class LayerNormNet(nn.Module):
    """ConvNeXt-style block: permute to channels-last, LayerNorm, Linear, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.norm = nn.LayerNorm(32)
        self.pw = nn.Linear(32, 48)
        self.conv = conv_bn(48, 48, stride=2)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.gelu(self.pw(self.norm(x)))
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        x = F.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


class LayerScaleNet(nn.Module):
    """A residual block scaled by a learned per-channel parameter of shape (C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.body = conv_bn(32, 32)
        self.gamma = nn.Parameter(torch.rand(32, 1, 1) + 0.5)
        self.down = conv_bn(32, 48, stride=2)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.gamma * F.relu(self.body(x))
        x = F.relu(self.down(x))
        return self.fc(x.mean((2, 3)))


def _hand(cls: type[nn.Module], shape: tuple[int, ...] = (1, 1, 16, 16)) -> Callable[[int], Built]:
    def build(seed: int = 0) -> Built:
        torch.manual_seed(seed)
        return _finish(cls(), shape)

    build.__name__ = cls.__name__
    return build


MODELS: dict[str, Callable[[int], Built]] = {
    "hf_resnet": hf_resnet,
    "hf_convnext": hf_convnext,
    "hf_mobilenet_v2": hf_mobilenet_v2,
    "hf_regnet": hf_regnet,
    "hf_efficientnet": hf_efficientnet,
    "functional": _hand(FunctionalNet),
    "reused_module": _hand(ReusedNet),
    "reads_attributes": _hand(AttrNet),
    "grouped_conv": _hand(GroupedNet),
    "spatial_gate": _hand(SpatialGateNet),
    "layernorm_cnn": _hand(LayerNormNet),
    "layer_scale": _hand(LayerScaleNet),
}
