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
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from zerobit.data.loaders import Batches, Splits
from zerobit.device import PRECISIONS, DeviceLike, model_device, resolve
from zerobit.train.evaluate import accuracy
from zerobit.train.loop import SCHEDULES, LoopSpec, fit


@dataclass(frozen=True)
class TrainRecipe:
    """Hyper-parameters of a from-scratch training run.

    Attributes:
        epochs: Passes over the training split.
        batch_size: Minibatch size (the last incomplete batch of an epoch is dropped).
        lr: Peak learning rate of SGD.
        optimizer: "sgd" or "adamw" (the ViT).
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 penalty, applied to conv/linear weights only (not BN parameters or biases).
        label_smoothing: Cross-entropy label smoothing.
        warmup_epochs: Linear warm-up length (from ``lr / 10``), may be fractional.
        schedule: Decay after warm-up: ``"cosine"`` (to 0), ``"linear"`` (to 0) or ``"constant"``.
        augment: Random 2-pixel-shift crops and horizontal flips.
        channels_last: Use the channels-last memory format for model and inputs (faster on CPU).
        precision: "float32", "bfloat16" (autocast for forward/backward; weights stay float32) or "auto" =
            bfloat16 where the device runs it natively (CUDA, CPUs with AMX).
        clip_norm: clip the gradient's global norm to this (0 = off).
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
    precision: str = "auto"
    clip_norm: float = 0.0
    seed: int = 0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("need lr > 0, warmup_epochs >= 0 and 0 <= label_smoothing < 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict:
        """Return the recipe as a JSON-serializable dict."""
        return asdict(self)


def loop_spec(recipe: TrainRecipe, steps_per_epoch: int) -> LoopSpec:
    """The training loop's settings for `recipe` over epochs of `steps_per_epoch` steps.

    Example:
        >>> f = loop_spec(TrainRecipe(epochs=2, warmup_epochs=1), steps_per_epoch=10).lr_factor
        >>> round(f(0), 2), round(f(10), 2), round(f(19), 2)
        (0.1, 1.0, 0.01)
    """
    total = recipe.epochs * steps_per_epoch
    return LoopSpec(steps=total, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                    weight_decay=recipe.weight_decay, warmup_steps=int(round(recipe.warmup_epochs * steps_per_epoch)),
                    schedule=recipe.schedule, clip_norm=recipe.clip_norm, precision=recipe.precision,
                    steps_per_epoch=steps_per_epoch, optimizer=recipe.optimizer)


def train(model: nn.Module, splits: Splits, recipe: TrainRecipe, progress: bool = True) -> dict:
    """Train ``model`` in place, where its parameters are, on ``splits.train``, evaluating ``splits.val`` after
    every epoch.

    The model is returned to the contiguous memory format at the end, so state dicts are plain.

    Returns:
        History: lists ``epoch``, ``train_loss``, ``val_accuracy``, ``lr`` and ``seconds`` (one entry per epoch),
        and ``restarts`` (steps where a non-finite step was undone).

    Example:
        >>> from zerobit import zoo
        >>> from zerobit.data import fashion_mnist_splits
        >>> hist = train(zoo.build("vgg"), fashion_mnist_splits(), TrainRecipe(epochs=1))  # doctest: +SKIP
    """
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    batches = Batches(splits.train, recipe.batch_size, shuffle=True, augment=recipe.augment, seed=recipe.seed,
                      drop_last=len(splits.train) >= recipe.batch_size, channels_last=recipe.channels_last)
    spec = loop_spec(recipe, len(batches))
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    history: dict[str, list] = {"epoch": [], "train_loss": [], "val_accuracy": [], "lr": [], "seconds": []}
    clock = [time.perf_counter()]

    def end_of_epoch(epoch: int, loss: float) -> str:
        val = accuracy(model, splits.val) if len(splits.val) else float("nan")
        lr = recipe.lr * spec.lr_factor(epoch * spec.steps_per_epoch)
        for key, value in zip(history, (epoch, loss, val, lr, time.perf_counter() - clock[0]), strict=True):
            history[key].append(value)
        clock[0] = time.perf_counter()
        return f"epoch {epoch}/{recipe.epochs}: loss {loss:.4f}, val accuracy {val:.4f}"

    try:
        run = fit(model, batches, spec, lambda m, b: criterion(m(b[0]).float(), b[1]), progress=progress,
                  desc="train", on_epoch=end_of_epoch)
    finally:
        model.to(memory_format=torch.contiguous_format)
    return history | {"restarts": run["restarts"]}


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` as safetensors (contiguous, detached CPU tensors)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def train_zoo_model(name: str, recipe: TrainRecipe | None = None, out_dir: str | Path | None = None,
                    progress: bool = True, device: DeviceLike = "auto") -> dict:
    """Train a zoo model on Fashion-MNIST and write ``{name}.safetensors`` and ``{name}.json`` (the card).

    Args:
        name: A name from :func:`zerobit.zoo.names`.
        recipe: Hyper-parameters; default ``TrainRecipe()``.
        out_dir: Destination directory; default :data:`zerobit.zoo.CHECKPOINT_DIR`.
        progress: Show a progress bar.
        device: Where to train ("auto" = CUDA when available).

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
    model = zoo.build(name).to(resolve(device))
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
        "device": str(model_device(model)),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.cpu(), out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    if progress:
        print(f"{name}: test accuracy {card['test_accuracy']:.4f}, {seconds:.0f} s -> {out / name}.safetensors")
    return card | {"history": history}
