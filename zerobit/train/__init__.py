"""Training and evaluation of zoo models.

Example:
    >>> from zerobit.train import TrainRecipe, accuracy, train_zoo_model
    >>> card = train_zoo_model("resnet20", TrainRecipe(epochs=8))  # doctest: +SKIP
"""

from __future__ import annotations

from zerobit.train.evaluate import accuracy, predictions
from zerobit.train.train import TrainRecipe, save_checkpoint, train, train_zoo_model

__all__ = ["TrainRecipe", "accuracy", "predictions", "save_checkpoint", "train", "train_zoo_model"]
