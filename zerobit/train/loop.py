"""The one training loop: zoo training from scratch and quantization-aware fine-tuning both run here.

Every step: move the batch to the model's device, forward under the configured precision, backward, clip the
gradient norm, step SGD and the learning-rate schedule. A step whose loss or gradient is not finite never reaches
the weights: the last good state (saved every `_Guard.EVERY` steps) comes back at half the learning rate, the
progress bar says so, and after `MAX_RESTARTS` such restarts the loop stops with a FloatingPointError.

Example:
    >>> from zerobit.data import Batches, get_splits
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> spec = LoopSpec(steps=20, lr=0.05)
    >>> hist = fit(model, Batches(get_splits("digits").train, 32, shuffle=True), spec,
    ...            lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), progress=False)
    >>> len(hist["loss"])
    20
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from zerobit.device import autocast, model_device, move
from zerobit.train.distributed import Replicas, world

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class LoopSpec:
    """Optimiser and schedule of one run of `fit`.

    Attributes:
        steps: optimiser steps in all.
        lr: peak SGD learning rate.
        momentum, nesterov: SGD momentum.
        optimizer: "sgd" (CNNs, QAT fine-tunes) or "adamw" (β = (0.9, 0.999); what transformers train with).
        weight_decay: L2 penalty on weights of 2 or more dimensions (not on BatchNorm parameters, biases or
            learned step sizes).
        warmup_steps: linear warm-up from lr/10.
        schedule: decay after warm-up: "cosine" (to 0), "linear" (to 0) or "constant".
        clip_norm: the gradient's global norm is clipped to this (0 = no clipping).
        precision: "float32", "bfloat16" (autocast) or "auto" (bfloat16 where the device runs it natively).
        steps_per_epoch: length of one pass over the data (for `on_epoch`); 0 = never call it.
    """

    steps: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    clip_norm: float = 0.0
    precision: str = "float32"
    steps_per_epoch: int = 0
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if (self.steps < 0 or self.lr <= 0 or self.clip_norm < 0 or self.schedule not in SCHEDULES
                or self.optimizer not in OPTIMIZERS):
            raise ValueError(f"invalid LoopSpec {self}: need steps ≥ 0, lr > 0, clip_norm ≥ 0, a schedule "
                             f"from {SCHEDULES} and an optimizer from {OPTIMIZERS}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` at `step` (linear warm-up, then the decay)."""
        warmup = min(self.warmup_steps, max(self.steps - 1, 0))
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = min(step - warmup, self.steps - warmup) / max(1, self.steps - warmup)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "linear":
            return 1.0 - progress
        return 1.0


@dataclass
class Checkpoint:
    """Where `fit` keeps its progress: after every epoch (and the last step) the weights, optimiser, schedule and
    history go to `path` (written atomically); a run that finds the file goes on from there.

    The resumed run continues at the saved step with the saved optimiser and schedule. Over zerobit's `Batches`
    (what a `TensorData` is fine-tuned with) the epochs left see the order and augmentation an uninterrupted run
    would; over other iterables they start their pass again, and dropout draws other numbers.

    Attributes:
        path: the checkpoint file.
        identity: JSON-able facts the file must match to be resumed (settings, budget, model); a file written by
            another run is refused with a ValueError.
        save_extra: the caller's own JSON-able state, kept in the file (called at every save).
        load_extra: gets that state back when a run resumes, before its first step.
    """

    path: str | os.PathLike
    identity: dict
    save_extra: Callable[[], dict] | None = None
    load_extra: Callable[[dict], None] | None = None

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scale: float, step: int,
             history: dict) -> None:
        extra = self.save_extra() if self.save_extra is not None else {}
        tmp = f"{self.path}.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "scale": scale, "step": step, "history": json.dumps(history),
                    "identity": json.dumps(self.identity, sort_keys=True), "extra": json.dumps(extra)}, tmp)
        os.replace(tmp, self.path)

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, history: dict) -> tuple[int, float]:
        """Restore a saved run into these objects: (step, learning-rate scale); (0, 1.0) when there is none."""
        if not os.path.exists(self.path):
            return 0, 1.0
        try:
            saved = torch.load(self.path, map_location=model_device(model), weights_only=True)
            mine = json.dumps(json.loads(json.dumps(self.identity)), sort_keys=True)
            same = saved["identity"] == mine
        except Exception as exc:  # a damaged or foreign file: say which, never train on it
            raise ValueError(f"{self.path} is not a readable zerobit training checkpoint ({type(exc).__name__}: "
                             f"{exc}); delete it to start again") from exc
        if not same:
            raise ValueError(f"{self.path} belongs to another run (other settings, budget or model); delete it or "
                             "use another checkpoint path")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        history.update(json.loads(saved["history"]))
        if self.load_extra is not None:
            self.load_extra(json.loads(saved["extra"]))
        return int(saved["step"]), float(saved["scale"])


def make_optimizer(params: Iterable[nn.Parameter], spec: LoopSpec) -> torch.optim.Optimizer:
    """SGD or AdamW with weight decay on ≥2-D weights only; a parameter with an `lr_scale` attribute learns at
    that multiple of the rate (e.g. SBS's gate thresholds)."""
    params = [p for p in params if p.requires_grad]
    groups = []
    for scale in sorted({getattr(p, "lr_scale", 1.0) for p in params}):
        same = [p for p in params if getattr(p, "lr_scale", 1.0) == scale]
        groups += [{"params": [p for p in same if p.dim() > 1], "weight_decay": spec.weight_decay,
                    "lr": spec.lr * scale},
                   {"params": [p for p in same if p.dim() <= 1], "weight_decay": 0.0, "lr": spec.lr * scale}]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr)
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)


def fit(model: nn.Module, batches: Iterable, spec: LoopSpec, loss_fn: LossFn, progress: bool = True,
        desc: str = "train", on_epoch: Callable[[int, float], str] | None = None,
        after_step: Callable[[], None] | None = None, checkpoint: Checkpoint | None = None) -> dict:
    """Train `model` in place for `spec.steps` steps over `batches` (re-iterated as often as needed).

    Args:
        loss_fn: ``(model, batch) -> loss``, the batch already on the model's device (called under the autocast
            of `spec.precision`).
        on_epoch: called with (epoch, mean loss) after every `spec.steps_per_epoch` steps; the text it
            returns is shown on the progress bar.
        after_step: called after every optimiser step (e.g. to keep parameters in their valid range).
        checkpoint: save progress after every epoch and resume from it (see `Checkpoint`; one process only).

    Data-parallel: when a torch.distributed group of more than one process is initialized (torchrun, or
    `FinetuneConfig.processes`), every rank must call `fit` with the same global batches; each trains on its
    slice of every batch under DistributedDataParallel (`loss_fn` gets the DDP wrapper, callable like the model)
    and the history holds the global batch's loss (see zerobit.train.distributed).

    Returns:
        History: ``loss`` per step, ``steps``, ``restarts`` (steps where a non-finite step was undone),
        ``clipped`` (steps whose gradient norm was clipped) and ``grad_norm`` (the largest seen).
    """
    history: dict = {"loss": [], "steps": spec.steps, "restarts": [], "clipped": 0, "grad_norm": 0.0}
    if spec.steps == 0:
        return history
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, spec)
    rank, size = world()
    bar = tqdm(total=spec.steps, desc=desc, disable=not (progress and rank == 0), leave=False, mininterval=1.0)
    guard = _Guard(model, opt, bar, history["restarts"], speak=rank == 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: guard.scale * spec.lr_factor(s))
    step = 0 if checkpoint is None else _resume(checkpoint, size, model, batches, spec, opt, sched, guard, history)
    bar.update(step)
    model.train()
    replicas = Replicas(model) if size > 1 and params else None
    net = model if replicas is None else replicas.net
    shown = _Shown(bar, on_epoch, progress and rank == 0)
    try:
        while step < spec.steps:
            for batch in batches:
                done = _train_step(net, batch, loss_fn, spec, opt, params, replicas, device, after_step)
                if done is None:
                    guard.recover(step)
                    continue
                norm, loss = done
                history["clipped"] += int(spec.clip_norm > 0 and norm > spec.clip_norm)
                history["grad_norm"] = max(history["grad_norm"], norm)
                sched.step()
                history["loss"].append(loss)
                step += 1
                guard.passed(step)
                shown.step(history["loss"][-1], sched.get_last_lr()[0])
                epoch_end = bool(spec.steps_per_epoch) and step % spec.steps_per_epoch == 0
                if epoch_end:
                    shown.epoch(step // spec.steps_per_epoch, net)
                if checkpoint is not None and (epoch_end or step == spec.steps):
                    checkpoint.save(model, opt, sched, guard.scale, step, history)
                if step >= spec.steps:
                    break
    finally:
        bar.close()
    model.eval()
    return history


def _train_step(net: nn.Module, batch: Any, loss_fn: LossFn, spec: LoopSpec, opt: torch.optim.Optimizer,
                params: list[nn.Parameter], replicas: Replicas | None, device: torch.device,
                after_step: Callable[[], None] | None) -> tuple[float, float] | None:
    """One optimiser step on `batch` (this rank's slice of it under DDP): (gradient norm, loss), or None when the
    loss or gradient was not finite and nothing was applied."""
    if replicas is not None:
        batch = replicas.shard(batch)
    batch = move(batch, device)
    with autocast(device, spec.precision):
        loss = loss_fn(net, batch)
    opt.zero_grad(set_to_none=True)
    norm, seen = _backward(loss, replicas, params, spec.clip_norm)
    if norm is None:
        return None
    opt.step()
    if after_step is not None:
        after_step()
    return norm, seen.item()


class _Shown:
    """The progress bar's running loss and learning rate, and the per-epoch callback (`fit`'s `on_epoch`)."""

    def __init__(self, bar: Any, on_epoch: Callable[[int, float], str] | None, show: bool) -> None:
        self.bar, self.on_epoch, self.show = bar, on_epoch, show
        self.running: float | None = None
        self.epoch_loss: list[float] = []

    def step(self, loss: float, lr: float) -> None:
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss
        self.epoch_loss.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.running:.3f}", lr=f"{lr:.3g}", refresh=False)

    def epoch(self, epoch: int, net: nn.Module) -> None:
        """Call `on_epoch` with the epoch's mean loss (it may evaluate the model: training mode comes back)."""
        if self.on_epoch is not None:
            text = self.on_epoch(epoch, sum(self.epoch_loss) / len(self.epoch_loss))
            if self.show and text:
                self.bar.write(text)
            net.train()
        self.epoch_loss = []


def _resume(checkpoint: Checkpoint, size: int, model: nn.Module, batches: Iterable, spec: LoopSpec,
            opt: torch.optim.Optimizer, sched: Any, guard: _Guard, history: dict) -> int:
    """Load `checkpoint` into the run's objects; the step to go on from (0 without a saved run)."""
    if size > 1:
        raise ValueError("fit: a checkpoint is kept by one process only; run data-parallel fits without one")
    step, guard.scale = checkpoint.load(model, opt, sched, history)
    guard.good = guard._snapshot()
    if step and spec.steps_per_epoch and isinstance(getattr(batches, "epoch", None), int):
        batches.epoch = step // spec.steps_per_epoch  # zerobit's Batches: the data the epochs left would see
    return step


def _backward(loss: torch.Tensor, replicas: Replicas | None, params: list[nn.Parameter],
              clip_norm: float) -> tuple[float | None, torch.Tensor]:
    """Backpropagate one step (this rank's weighted share of it under DDP) and clip. Returns the gradient's norm,
    or None when the step must be skipped, and the loss to record (the global batch's under DDP)."""
    if replicas is None:
        seen = loss.detach()
        return _backward_and_clip(loss, seen, params, clip_norm), seen
    seen = replicas.mean_loss(loss)  # every rank takes or skips the step: a lone skip would hang the all-reduce
    norm = _backward_and_clip(replicas.scaled(loss), seen, params, clip_norm)
    return (norm if norm is not None and replicas.all_finite(norm) else None), seen


def _backward_and_clip(loss: torch.Tensor, value: torch.Tensor, params: list[nn.Parameter],
                       clip_norm: float) -> float | None:
    """Backpropagate `loss` and clip; the gradient's norm, or None when `value` (the loss, or the global batch's
    loss) or the gradient is not finite."""
    if not torch.isfinite(value):
        return None
    loss.backward()
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    max_norm = clip_norm if clip_norm > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return norm if math.isfinite(norm) else None


class _Guard:
    """Keeps the last good weights; on a non-finite step brings them back at half the learning rate."""

    MAX_RESTARTS = 3
    EVERY = 50  # steps between saved good states (a copy of the weights: cheap next to 50 steps)

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, bar: tqdm, restarts: list[int],
                 speak: bool = True) -> None:
        self.model, self.opt, self.bar, self.speak = model, opt, bar, speak
        self.scale = 1.0  # of the scheduled learning rate
        self.restarts = restarts
        self.good = self._snapshot()

    def _snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict())

    def passed(self, step: int) -> None:
        if step % self.EVERY == 0:
            self.good = self._snapshot()

    def recover(self, step: int) -> None:
        self.restarts.append(step)
        if len(self.restarts) > self.MAX_RESTARTS:
            raise FloatingPointError(
                f"training diverged {len(self.restarts)} times (steps {self.restarts}), even at {self.scale:g}× "
                "the learning rate; lower the learning rate, check the data for extreme values, or choose a "
                "larger budget")
        lrs = [g["lr"] for g in self.opt.param_groups]
        self.model.load_state_dict(self.good[0])
        self.opt.load_state_dict(self.good[1])
        self.scale /= 2
        for g, lr in zip(self.opt.param_groups, lrs, strict=True):  # the schedule's current rate, halved
            g["lr"] = lr / 2
        if self.speak:
            self.bar.write(f"non-finite loss or gradient at step {step}; restored the last good weights, "
                           f"learning rate now {self.scale:g}× the schedule")


MAX_RESTARTS = _Guard.MAX_RESTARTS
