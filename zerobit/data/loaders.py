"""In-memory datasets, train/val/test splits and a fast minibatch iterator.

Example:
    >>> from zerobit.data import Batches, get_splits
    >>> splits = get_splits("digits")
    >>> x, y = next(iter(Batches(splits.train, batch_size=32, shuffle=True, augment=True)))
    >>> tuple(x.shape), tuple(y.shape)
    ((32, 1, 8, 8), (32,))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SPLIT_NAMES: tuple[str, ...] = ("fashion-mnist", "digits")


@dataclass(frozen=True)
class TensorData:
    """A labelled image set held in memory.

    Attributes:
        x: Images, float32, shape (N, C, H, W), already normalized.
        y: Integer labels, int64, shape (N,).
        fill: The normalized value of a black (raw 0) pixel; used as padding by augmentation.

    Example:
        >>> d = TensorData(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64))
        >>> len(d.subset(2))
        2
    """

    x: Tensor
    y: Tensor
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"TensorData.x must have shape (N, C, H, W), got {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"TensorData.y must have shape ({self.x.shape[0]},) to match x, got {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int) -> TensorData:
        """Return the first ``n`` examples (a view, no copy).

        Example:
            >>> small = data.subset(256)  # doctest: +SKIP
        """
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return TensorData(self.x[:n], self.y[:n], self.fill)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test sets of one dataset.

    Example:
        >>> s = get_splits("digits")  # doctest: +SKIP
        >>> s.input_shape, s.num_classes  # doctest: +SKIP
        ((1, 8, 8), 10)
    """

    train: TensorData
    val: TensorData
    test: TensorData
    num_classes: int
    input_shape: tuple[int, int, int]


def get_splits(name: str, **kw: Any) -> Splits:
    """Load a dataset's splits by name.

    Args:
        name: ``"fashion-mnist"`` or ``"digits"``.
        **kw: Passed to :func:`fashion_mnist_splits` or :func:`digits_splits`.

    Example:
        >>> splits = get_splits("fashion-mnist", val_size=5000)  # doctest: +SKIP
    """
    if name == "fashion-mnist":
        from zerobit.data.fashion_mnist import fashion_mnist_splits

        return fashion_mnist_splits(**kw)
    if name == "digits":
        from zerobit.data.digits import digits_splits

        return digits_splits(**kw)
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(SPLIT_NAMES)}")


def random_crop_flip(x: Tensor, gen: torch.Generator, pad: int = 2, fill: float = 0.0,
                     hflip: bool = True) -> Tensor:
    """Random-crop each image after ``pad`` pixels of ``fill`` padding, then randomly flip it.

    Fully vectorized over the batch (one gather, no Python loop per image).

    Example:
        >>> out = random_crop_flip(torch.randn(8, 1, 28, 28), torch.Generator().manual_seed(0))
        >>> tuple(out.shape)
        (8, 1, 28, 28)
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)
    rows = (dy + torch.arange(h)).unsqueeze(2)  # (N, H, 1)
    cols = (dx + torch.arange(w)).unsqueeze(1)  # (N, 1, W)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(flip.view(n, 1, 1), cols.flip(2), cols)
    batch = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, H, W, C)
    return plain_strides(out.permute(0, 3, 1, 2))


def plain_strides(x: Tensor) -> Tensor:
    """`x` with the row-major strides of its shape.

    A (N, 1, H, W) tensor permuted from (N, H, W, 1) counts as contiguous yet carries channels-last strides;
    torch 2.13's CPU convolutions then take a channels-last path, and the backward pass of a heavily pruned
    ResNet-20 on one thread corrupted memory (segmentation fault) on such batches.
    """
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class Batches:
    """Iterable of ``(x, y)`` minibatches over a :class:`TensorData`.

    Every ``iter()`` starts a new epoch: with ``shuffle``/``augment`` the randomness comes from a
    ``torch.Generator`` seeded with ``seed + epoch``, so runs are reproducible yet each epoch differs.

    Args:
        data: The examples.
        batch_size: Examples per batch.
        shuffle: Reshuffle the order every epoch.
        augment: Random crop (2-pixel padding with ``data.fill``) plus random horizontal flip.
        seed: Base seed.
        drop_last: Drop the final incomplete batch.
        channels_last: Return ``x`` in ``torch.channels_last`` memory format.
        hflip: Include the horizontal flip in the augmentation.

    Example:
        >>> batches = Batches(splits.train, batch_size=128, shuffle=True, augment=True)  # doctest: +SKIP
        >>> for x, y in batches:  # doctest: +SKIP
        ...     loss = criterion(model(x), y)
    """

    def __init__(self, data: TensorData, batch_size: int = 128, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 hflip: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.hflip = hflip
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.data)
        order = torch.randperm(n, generator=gen) if self.shuffle else None
        fill = float(getattr(self.data, "fill", 0.0))
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                x, y = self.data.x[lo:hi], self.data.y[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.data.x[idx], self.data.y[idx]
            if self.augment:
                x = random_crop_flip(x, gen, pad=2, fill=fill, hflip=self.hflip)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else plain_strides(x)
            yield x, y


def batches_of(data: Any, batch_size: int, shuffle: bool = False, augment: bool = False, seed: int = 0,
               drop_last: bool = False) -> Iterable:
    """Minibatches of `data`: a `TensorData` is batched here (with shuffling/augmentation as asked); any other
    re-iterable (a DataLoader, a list of batches) is already batched and is used as it is."""
    if isinstance(data, TensorData):
        return Batches(data, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                       drop_last=drop_last and len(data) >= batch_size)
    return data


def num_batches(data: Iterable) -> int:
    """Batches in one pass over `data` (counted by iterating when it has no len())."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


def check_data(data: Any, what: str) -> None:
    """A clear TypeError unless `data` is a TensorData or a re-iterable of batches."""
    if isinstance(data, TensorData):
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable) or isinstance(data, Iterator):
        raise TypeError(f"{what} must be a zerobit TensorData or a re-iterable of batches (a torch DataLoader, a "
                        f"list of tensors, (x, y) tuples or dicts), got {type(data).__name__}"
                        + (": a one-pass iterator or generator cannot be read once per epoch; wrap it in a list"
                           if isinstance(data, Iterator) else ""))


def take_examples(data: Any, n: int, batch_size: int = 500) -> list:
    """The first batches of `data` holding at least `n` examples (all of it when it holds fewer); always the same
    ones for a TensorData or an unshuffled loader."""
    if isinstance(data, TensorData):
        return list(Batches(data.subset(min(n, len(data))), batch_size))
    from zerobit.task import DEFAULT_TASK

    out, count = [], 0
    for batch in data:
        out.append(batch)
        count += DEFAULT_TASK.batch_size(batch)
        if count >= n:
            break
    return out
