"""Quantization-aware fine-tuning with knowledge distillation from the uncompressed model.

Data-parallel fine-tuning (see zerobit.train.distributed): ``FinetuneConfig(processes=2)`` trains in 2 local
processes, or run your script under ``torchrun --nproc_per_node=2 your_script.py`` with a process group initialized
(every rank runs the same `zerobit.compress` under the same seed; only rank 0 should save).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from zerobit.data.loaders import batches_of, num_batches
from zerobit.device import PRECISIONS
from zerobit.quant.modules import ActQuant, QuantLayer
from zerobit.task import Task, get_task
from zerobit.train.distributed import initialized, spawn_finetune
from zerobit.train.loop import MAX_RESTARTS, Checkpoint, LoopSpec, fit

__all__ = ["MAX_RESTARTS", "QUANTIZERS", "FinetuneConfig", "finetune"]
QUANTIZERS = ("mse", "lsq")


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
        clip_norm: the gradient's global norm is clipped to this (0 = off); a safety net against the rare huge
            step of low-bit QAT, above the norms of a healthy run.
        precision: "float32", "bfloat16" (autocast for forward/backward; weights, scales and the stored model
            stay float32) or "auto" = bfloat16 where the device runs it natively (CUDA, CPUs with AMX).
        quantizer: how quantization steps are set while training: "mse" = per channel from max|w| times the clip
            ratio that minimised the squared error at apply time, activations fixed at calibration; "lsq" = the
            steps (per output channel for weights, per tensor for activations) start there and are learned.
        processes: local processes that fine-tune data-parallel (each takes a share of every batch of
            `batch_size`; the cores are split between them). With processes > 1 the model, teacher, data and task
            are pickled to the processes (classes at module level), and fine-tunes that take callbacks (SBS,
            ADMM) refuse to run: run those under torchrun instead. Ignored under torchrun, which already runs
            one process per rank.
        checkpoint: a file where `compress`'s final fine-tune keeps its progress after every epoch; a killed
            compress started again with the same file, policy and settings goes on from the last epoch and ends
            as an uninterrupted run would (one process only). `zerobit compress` keeps it in its --out folder.
    """

    epochs: float = 1.0
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-5
    distill: float = 0.7
    temperature: float = 2.0
    seed: int = 0
    augment: bool = True
    clip_norm: float = 10.0
    precision: str = "auto"
    quantizer: str = "mse"
    processes: int = 1
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and self.processes > 1:
            raise ValueError("FinetuneConfig: a checkpoint is kept by one process; use processes=1 with it")
        if (self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or not 0 <= self.distill <= 1
                or self.clip_norm < 0 or self.precision not in PRECISIONS or self.quantizer not in QUANTIZERS
                or self.processes < 1):
            raise ValueError(f"invalid FinetuneConfig {self}: need epochs ≥ 0, lr > 0, batch_size ≥ 1, "
                             f"0 ≤ distill ≤ 1, clip_norm ≥ 0, precision in {PRECISIONS}, quantizer in {QUANTIZERS}, "
                             "processes ≥ 1")

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model: nn.Module, train_data: Iterable, config: FinetuneConfig | None = None,
             teacher: nn.Module | None = None, progress: bool = True, epochs: float | None = None,
             penalty: Callable[[], torch.Tensor] | None = None, steps: int | None = None,
             task: Task | None = None, on_epoch: Callable[[int, float], str] | None = None,
             checkpoint: Checkpoint | None = None) -> dict:
    """Fine-tune `model` in place (QAT when its layers are QuantLayers) on its device; returns the loss history.

    Args:
        model: the (fake-quant) model to train; it trains where its parameters are (CPU or CUDA).
        train_data: training split (never the validation or test split): a TensorData (batched and augmented
            here) or any re-iterable of batches (a DataLoader); batches move to the model's device.
        config: optimiser, precision and distillation settings.
        teacher: the uncompressed model (on the same device); its softened outputs are distilled into `model`.
        progress: show a progress bar.
        epochs: overrides `config.epochs` (e.g. what is left of a shared fine-tune budget).
        penalty: an extra loss term added at every step (e.g. ADMM's proximal pull).
        steps: overrides both epoch counts with a number of optimiser steps (e.g. a search's cheap recovery).
        task: how batches are run and what the loss is (default: classification, see zerobit.task).
        on_epoch: called with (epoch, mean loss) after each pass over the data (and after the last step of a
            shorter run); the text it returns is printed above the progress bar.
        checkpoint: keep progress after every epoch and resume from it (`zerobit.train.loop.Checkpoint`).

    Data-parallel: with `config.processes` > 1 and no process group initialized, the fine-tune runs in that many
    local processes (`spawn_finetune`); with a group initialized (torchrun), in this process as one rank of it.

    Raises:
        ValueError: `config.processes` > 1 with a `penalty` or `on_epoch` callback (they cannot be sent to other
            processes): run the script under torchrun, or use processes=1.

    Example:
        >>> # finetune(qmodel, splits.train, FinetuneConfig(epochs=1), teacher=model)
        >>> # finetune(qmodel, splits.train, FinetuneConfig(epochs=1, processes=2), teacher=model)  # 2 processes
    """
    config = config or FinetuneConfig()
    epochs = config.epochs if epochs is None else epochs
    task = get_task(task)
    batches = batches_of(train_data, config.batch_size, shuffle=True, augment=config.augment, seed=config.seed,
                         drop_last=True)
    steps = int(round(epochs * num_batches(batches))) if steps is None else steps
    if config.processes > 1 and steps > 0 and not initialized():
        _check_sendable(config.processes, penalty, on_epoch, checkpoint)
        return spawn_finetune(model, train_data, config, teacher, processes=config.processes, task=task,
                              steps=steps, progress=progress)
    spec = LoopSpec(steps=steps, lr=config.lr, weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                    precision=config.precision, steps_per_epoch=min(num_batches(batches), steps))
    torch.manual_seed(config.seed)
    if teacher is not None:
        teacher.eval()
    sync = _learn_steps(model) if config.quantizer == "lsq" and steps > 0 else None

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            t_out = task.forward(teacher, batch) if teacher is not None and config.distill > 0 else None
        loss = task.loss(m, batch, t_out, config.distill, config.temperature)
        return loss if penalty is None else loss + penalty()

    return fit(model, batches, spec, loss_fn, progress=progress, desc="fine-tune", after_step=sync,
               on_epoch=on_epoch, checkpoint=checkpoint)


def _check_sendable(processes: int, *callbacks: Any) -> None:
    """A fine-tune spawned in `processes` processes cannot take callbacks or a checkpoint (penalty, on_epoch,
    checkpoint): they cannot be sent to the other processes."""
    if any(c is not None for c in callbacks):
        raise ValueError(f"FinetuneConfig.processes={processes}: this fine-tune takes a callback or a checkpoint "
                         "(penalty, on_epoch, checkpoint: as the SBS and ADMM searches do) that cannot be sent to "
                         f"other processes; run your script under torchrun --nproc_per_node={processes} instead "
                         "(see zerobit.train.distributed), or use processes=1")


def _learn_steps(model: nn.Module) -> Callable[[], None]:
    """Make every quantization step of `model` learnable (LSQ); returns what keeps the stored activation steps
    equal to the learned ones after each optimiser step."""
    acts = []
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.learn_steps()
        elif isinstance(m, ActQuant):
            m.learn_scale()
            acts.append(m)

    def sync() -> None:
        for m in acts:
            m.sync()

    return sync
