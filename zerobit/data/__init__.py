"""Datasets: Fashion-MNIST (IDX files), scikit-learn digits, splits and minibatch iteration.

Example:
    >>> from zerobit.data import Batches, get_splits
    >>> splits = get_splits("fashion-mnist")  # doctest: +SKIP
    >>> batches = Batches(splits.train, batch_size=128, shuffle=True, augment=True)  # doctest: +SKIP
"""

from __future__ import annotations

from zerobit.data.digits import digits_splits
from zerobit.data.fashion_mnist import MEAN, STD, fashion_mnist_splits, load_fashion_mnist, parse_idx
from zerobit.data.loaders import (
    SPLIT_NAMES,
    Batches,
    Splits,
    TensorData,
    batches_of,
    check_data,
    get_splits,
    num_batches,
    take_examples,
)

__all__ = [
    "MEAN",
    "SPLIT_NAMES",
    "STD",
    "Batches",
    "Splits",
    "TensorData",
    "batches_of",
    "check_data",
    "digits_splits",
    "fashion_mnist_splits",
    "get_splits",
    "num_batches",
    "load_fashion_mnist",
    "parse_idx",
    "take_examples",
]
