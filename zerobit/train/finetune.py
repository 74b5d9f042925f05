"""Quantization-aware fine-tuning with knowledge distillation from the uncompressed model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zerobit.data.loaders import Batches, TensorData


@dataclass(frozen=True)
class FinetuneConfig:
    """How the compressed model is fine-tuned.

    Attributes:
        epochs: passes over the training data (fractions allowed, e.g. 0.25).
        lr: peak SGD learning rate (cosine decay to 0).
        batch_size: minibatch size.
        weight_decay: L2 penalty.
        distill: weight of the distillation term (0 = labels only, 1 = teacher only).
        temperature: softmax temperature of the distillation term.
        seed: makes runs repeatable.
        augment: random crop + flip on training batches.
    """

    epochs: float = 1.0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-5
    distill: float = 0.7
    temperature: float = 2.0
    seed: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or not 0 <= self.distill <= 1:
            raise ValueError(f"invalid FinetuneConfig {self}: need epochs ≥ 0, lr > 0, batch_size ≥ 1, "
                             "0 ≤ distill ≤ 1")

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                      distill: float, temperature: float) -> torch.Tensor:
    """(1−α)·CE(labels) + α·T²·KL(teacher ‖ student) at temperature T."""
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None or distill == 0:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - distill) * ce + distill * kd


def finetune(model: nn.Module, train_data: TensorData, config: FinetuneConfig | None = None,
             teacher: nn.Module | None = None, progress: bool = True, epochs: float | None = None,
             penalty: Callable[[], torch.Tensor] | None = None, steps: int | None = None) -> dict:
    """Fine-tune `model` in place (QAT when its layers are QuantLayers); returns the loss history.

    Args:
        model: the (fake-quant) model to train.
        train_data: training split (never the validation or test split).
        config: optimiser and distillation settings.
        teacher: the uncompressed model; its softened outputs are distilled into `model`.
        progress: show a progress bar.
        epochs: overrides `config.epochs` (e.g. what is left of a shared fine-tune budget).
        penalty: an extra loss term added at every step (e.g. ADMM's proximal pull).
        steps: overrides both epoch counts with a number of optimiser steps (e.g. a search's cheap recovery).

    Example:
        >>> # finetune(qmodel, splits.train, FinetuneConfig(epochs=1), teacher=model)
    """
    config = config or FinetuneConfig()
    epochs = config.epochs if epochs is None else epochs
    batches = Batches(train_data, config.batch_size, shuffle=True, augment=config.augment, seed=config.seed,
                      drop_last=True)
    steps = int(round(epochs * len(batches))) if steps is None else steps
    history: dict = {"loss": [], "steps": steps}
    if steps == 0:
        return history
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress, leave=False)
    guard = _DivergenceGuard(model, opt, bar)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: guard.scale * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    if teacher is not None:
        teacher.eval()
    model.train()
    step, running = 0, None
    history["restarts"] = guard.restarts
    while step < steps:
        for x, y in batches:
            with torch.no_grad():
                t_logits = teacher(x) if teacher is not None else None
            loss = distillation_loss(model(x), y, t_logits, config.distill, config.temperature)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
            if not torch.isfinite(loss) or not _finite_grads(params):
                guard.recover(step)
                continue
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            history["loss"].append(loss.item())
            step += 1
            guard.passed(step)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if step >= steps:
                break
    bar.close()
    model.eval()
    return history


class _DivergenceGuard:
    """Keeps the last good weights; on a non-finite step brings them back at half the learning rate."""

    MAX_RESTARTS = 3
    EVERY = 50  # steps between saved good states (a copy of the weights: cheap next to 50 steps)

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, bar: tqdm) -> None:
        self.model, self.opt, self.bar = model, opt, bar
        self.scale = 1.0  # of the scheduled learning rate
        self.restarts: list[int] = []
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
                f"fine-tuning diverged {len(self.restarts)} times (steps {self.restarts}), even at {self.scale:g}× "
                "the learning rate; lower FinetuneConfig.lr, check the data for extreme values, or choose a "
                "larger budget")
        lrs = [g["lr"] for g in self.opt.param_groups]
        self.model.load_state_dict(self.good[0])
        self.opt.load_state_dict(self.good[1])
        self.scale /= 2
        for g, lr in zip(self.opt.param_groups, lrs, strict=True):  # the schedule's current rate, halved
            g["lr"] = lr / 2
        self.bar.write(f"fine-tune: non-finite loss or gradient at step {step}; restored the last good weights, "
                       f"learning rate now {self.scale:g}× the schedule")


MAX_RESTARTS = _DivergenceGuard.MAX_RESTARTS


def _finite_grads(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.detach().abs().max() for g in grads])).all())
