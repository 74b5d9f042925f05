"""Train zoo models from scratch with SGD + warmup/cosine schedule and save safetensors checkpoints.

Example:
    >>> from zerobit.train.train import TrainRecipe, train_zoo_model
    >>> card = train_zoo_model("resnet20", TrainRecipe(epochs=8))  # doctest: +SKIP
    >>> card["test_accuracy"] > 0.93  # doctest: +SKIP
    True
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from zerobit.data.loaders import Batches, Splits
from zerobit.train.evaluate import accuracy

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of a from-scratch training run.

    Attributes:
        epochs: Passes over the training split.
        batch_size: Minibatch size (the last incomplete batch of an epoch is dropped).
        lr: Peak learning rate of SGD.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 penalty, applied to conv/linear weights only (not BN parameters or biases).
        label_smoothing: Cross-entropy label smoothing.
        warmup_epochs: Linear warm-up length (from ``lr / 10``), may be fractional.
        schedule: Decay after warm-up: ``"cosine"`` (to 0), ``"linear"`` (to 0) or ``"constant"``.
        augment: Random 2-pixel-shift crops and horizontal flips.
        channels_last: Use the channels-last memory format for model and inputs (faster on CPU).
        bf16: Run forward/backward under CPU bfloat16 autocast (weights stay float32); roughly
            1.7x faster on CPUs with AMX/AVX512-BF16, slower elsewhere.
        seed: Seeds model initialization, data order and augmentation.

    Example:
        >>> TrainRecipe(epochs=2).to_dict()["epochs"]
        2
    """

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    augment: bool = True
    channels_last: bool = True
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("need lr > 0, warmup_epochs >= 0 and 0 <= label_smoothing < 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        """Return the recipe as a JSON-serializable dict."""
        return asdict(self)


def lr_factor(recipe: TrainRecipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Return ``step -> multiplier of recipe.lr`` (linear warm-up, then the chosen decay).

    Example:
        >>> f = lr_factor(TrainRecipe(epochs=2, warmup_epochs=1), steps_per_epoch=10)
        >>> round(f(0), 2), round(f(10), 2), round(f(19), 2)
        (0.1, 1.0, 0.01)
    """
    total = recipe.epochs * steps_per_epoch
    warmup = min(int(round(recipe.warmup_epochs * steps_per_epoch)), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if recipe.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if recipe.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.SGD:
    """SGD with weight decay on >=2-D weights only (BN scales/shifts and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)


def _train_epoch(model: nn.Module, batches: Batches, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module, recipe: TrainRecipe,
                 bar: tqdm) -> float:
    model.train()
    total, count = 0.0, 0
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, count = total + loss.item() * len(y), count + len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{sched.get_last_lr()[0]:.4f}", refresh=False)
    return total / max(count, 1)


def train(model: nn.Module, splits: Splits, recipe: TrainRecipe, progress: bool = True) -> dict:
    """Train ``model`` in place on ``splits.train``, evaluating ``splits.val`` after every epoch.

    The model is returned to the contiguous memory format at the end, so state dicts are plain.

    Returns:
        History: lists ``epoch``, ``train_loss``, ``val_accuracy``, ``lr`` and ``seconds`` (one entry per epoch).

    Example:
        >>> from zerobit import zoo
        >>> from zerobit.data import fashion_mnist_splits
        >>> hist = train(zoo.build("vgg"), fashion_mnist_splits(), TrainRecipe(epochs=1))  # doctest: +SKIP
    """
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    batches = Batches(splits.train, recipe.batch_size, shuffle=True, augment=recipe.augment, seed=recipe.seed,
                      drop_last=len(splits.train) >= recipe.batch_size, channels_last=recipe.channels_last)
    opt = make_optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe, len(batches)))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    history: dict[str, list] = {"epoch": [], "train_loss": [], "val_accuracy": [], "lr": [], "seconds": []}
    try:
        for epoch in range(recipe.epochs):
            start = time.perf_counter()
            with tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress,
                      mininterval=1.0, leave=True) as bar:
                loss = _train_epoch(model, batches, opt, sched, criterion, recipe, bar)
                val = accuracy(model, splits.val) if len(splits.val) else float("nan")
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{val:.4f}")
            for key, value in zip(history, (epoch + 1, loss, val, sched.get_last_lr()[0],
                                            time.perf_counter() - start), strict=True):
                history[key].append(value)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return history


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` as safetensors (contiguous, detached CPU tensors)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def train_zoo_model(name: str, recipe: TrainRecipe | None = None, out_dir: str | Path | None = None,
                    progress: bool = True) -> dict:
    """Train a zoo model on Fashion-MNIST and write ``{name}.safetensors`` and ``{name}.json`` (the card).

    Args:
        name: A name from :func:`zerobit.zoo.names`.
        recipe: Hyper-parameters; default ``TrainRecipe()``.
        out_dir: Destination directory; default :data:`zerobit.zoo.CHECKPOINT_DIR`.
        progress: Show a tqdm bar per epoch.

    Returns:
        The card (model, dataset, recipe, test/val accuracy, params, seconds, ...) plus the ``history``.

    Example:
        >>> card = train_zoo_model("vgg", out_dir="/tmp/ckpt")  # doctest: +SKIP
    """
    from zerobit import zoo
    from zerobit.data.fashion_mnist import MEAN, STD, fashion_mnist_splits

    recipe = recipe or TrainRecipe()
    out = Path(out_dir) if out_dir is not None else zoo.CHECKPOINT_DIR
    splits = fashion_mnist_splits()
    torch.manual_seed(recipe.seed)
    model = zoo.build(name)
    start = time.perf_counter()
    history = train(model, splits, recipe, progress=progress)
    seconds = time.perf_counter() - start
    card = {
        "model": name,
        "dataset": "fashion-mnist",
        "input_shape": list(splits.input_shape),
        "num_classes": splits.num_classes,
        "normalization": {"mean": MEAN, "std": STD},
        "recipe": recipe.to_dict(),
        "test_accuracy": accuracy(model, splits.test),
        "val_accuracy": history["val_accuracy"][-1],
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(sum(history["seconds"]) / len(history["seconds"]), 1),
        "val_accuracy_per_epoch": history["val_accuracy"],
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    if progress:
        print(f"{name}: test accuracy {card['test_accuracy']:.4f}, {seconds:.0f} s -> {out / name}.safetensors")
    return card | {"history": history}
