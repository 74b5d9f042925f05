"""Model zoo: Fashion-MNIST models and their trained checkpoints (safetensors + JSON cards).

Example:
    >>> from zerobit import zoo
    >>> zoo.names()
    ['mobilenetv2', 'resnet20', 'vgg', 'vit']
    >>> model = zoo.load_pretrained("resnet20")  # doctest: +SKIP
    >>> model(zoo.example_input("resnet20")).shape  # doctest: +SKIP
    torch.Size([1, 10])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from zerobit.zoo.models import VGG, MobileNetV2, ResNet20, mobilenetv2, resnet20, vgg
from zerobit.zoo.vit import ViT, vit

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mobilenetv2": mobilenetv2,
    "resnet20": resnet20,
    "vgg": vgg,
    "vit": vit,
}
CNNS: tuple[str, ...] = ("mobilenetv2", "resnet20", "vgg")


def names() -> list[str]:
    """Return the sorted names of all zoo models.

    Example:
        >>> "resnet20" in names()
        True
    """
    return sorted(_BUILDERS)


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(names())}")


def build(name: str) -> nn.Module:
    """Build a randomly initialized zoo model (train mode).

    Raises:
        ValueError: Unknown name (the message lists the valid names).

    Example:
        >>> build("vgg").fc.out_features
        10
    """
    _check_name(name)
    return _BUILDERS[name]()


def checkpoint_path(name: str) -> Path:
    """Path of ``{name}.safetensors`` in :data:`CHECKPOINT_DIR` (may not exist)."""
    _check_name(name)
    return CHECKPOINT_DIR / f"{name}.safetensors"


def load_pretrained(name: str) -> nn.Module:
    """Build a zoo model and load its trained weights (safetensors only, never pickle), in eval mode.

    Raises:
        ValueError: Unknown name.
        FileNotFoundError: No checkpoint yet; the message says how to train one.

    Example:
        >>> model = load_pretrained("resnet20")  # doctest: +SKIP
        >>> model.training  # doctest: +SKIP
        False
    """
    from safetensors.torch import load_file

    path = checkpoint_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint for {name!r} at {path}; create it with `zerobit train --model {name}`")
    model = build(name)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def card(name: str) -> dict:
    """Return the JSON card of a trained checkpoint (recipe, accuracies, parameter count, ...).

    Example:
        >>> card("resnet20")["test_accuracy"] > 0.93  # doctest: +SKIP
        True
    """
    _check_name(name)
    path = CHECKPOINT_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no card for {name!r} at {path}; create it with `zerobit train --model {name}`")
    return json.loads(path.read_text())


def example_input(name: str, batch: int = 1) -> Tensor:
    """A deterministic random input of shape ``(batch, 1, 28, 28)`` for tracing and export.

    Example:
        >>> tuple(example_input("vgg").shape)
        (1, 1, 28, 28)
    """
    _check_name(name)
    return torch.randn(batch, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


__all__ = [
    "CHECKPOINT_DIR",
    "INPUT_SHAPE",
    "VGG",
    "MobileNetV2",
    "CNNS",
    "ResNet20",
    "ViT",
    "build",
    "card",
    "checkpoint_path",
    "example_input",
    "load_pretrained",
    "mobilenetv2",
    "names",
    "resnet20",
    "vgg",
    "vit",
]
