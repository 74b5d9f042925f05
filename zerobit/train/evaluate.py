"""Batched evaluation: predicted labels and top-1 accuracy.

Example:
    >>> from zerobit import zoo
    >>> from zerobit.data import get_splits
    >>> acc = accuracy(zoo.load_pretrained("resnet20"), get_splits("fashion-mnist").test)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from zerobit.device import model_device, move


class LabelledData(Protocol):
    """Anything with images ``x`` (N, C, H, W) and labels ``y`` (N,), e.g. ``TensorData``."""

    x: Tensor
    y: Tensor


@torch.no_grad()
def predictions(model: nn.Module, data: LabelledData, batch_size: int = 1000) -> Tensor:
    """Return the argmax class of every example, int64 of shape (N,).

    The model runs in eval mode under ``torch.no_grad()``; its previous train/eval mode is restored.

    Example:
        >>> pred = predictions(model, splits.test)  # doctest: +SKIP
        >>> pred.shape  # doctest: +SKIP
        torch.Size([10000])
    """
    if len(data.x) == 0:
        return torch.empty(0, dtype=torch.int64)
    return logits(model, data.x, batch_size).argmax(dim=1).cpu()


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """The model's outputs for every example, in eval mode, batch by batch on the model's device (the outputs stay
    there); its previous mode is restored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training, device = model.training, model_device(model)
    model.eval()
    try:
        return torch.cat([model(move(x[i:i + batch_size], device)) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, data: LabelledData, batch_size: int = 1000) -> float:
    """Fraction of correctly classified examples, in [0, 1].

    Raises:
        ValueError: ``data`` is empty.

    Example:
        >>> accuracy(model, splits.val)  # doctest: +SKIP
        0.9371
    """
    if len(data.y) == 0:
        raise ValueError("cannot compute accuracy on an empty dataset; pass a non-empty split")
    pred = predictions(model, data, batch_size)
    return int((pred == data.y).sum()) / len(data.y)
