"""scikit-learn's 8x8 handwritten digits as a tiny, download-free dataset (handy for fast tests).

Example:
    >>> from zerobit.data.digits import digits_splits
    >>> s = digits_splits()  # doctest: +SKIP
    >>> len(s.train), len(s.val), len(s.test), s.input_shape  # doctest: +SKIP
    (1200, 300, 297, (1, 8, 8))
"""

from __future__ import annotations

import torch

from zerobit.data.loaders import Splits, TensorData

N_TRAIN = 1200
N_VAL = 300


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "digits_splits needs scikit-learn: `pip install scikit-learn` (or `pip install zerobit[dev]`)"
        ) from err
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x.unsqueeze(1), y


def digits_splits(seed: int = 0) -> Splits:
    """Fixed, seeded 1200 / 300 / 297 split of the 1797 digits, normalized with the train mean/std.

    Args:
        seed: Seed of the permutation assigning images to splits.

    Raises:
        ImportError: scikit-learn is not installed.

    Example:
        >>> s = digits_splits(seed=0)  # doctest: +SKIP
        >>> tuple(s.train.x.shape)  # doctest: +SKIP
        (1200, 1, 8, 8)
    """
    x, y = _load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_VAL], perm[N_TRAIN + N_VAL:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    fill = float((0.0 - mean) / std)
    return Splits(
        train=TensorData(x[tr], y[tr], fill),
        val=TensorData(x[va], y[va], fill),
        test=TensorData(x[te], y[te], fill),
        num_classes=10,
        input_shape=(1, 8, 8),
    )
