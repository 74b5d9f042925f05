"""Tasks: how zerobit runs a model on a batch of the user's data and judges what comes out.

Data is any re-iterable of batches (a `torch.utils.data.DataLoader`, a list, or zerobit's own `TensorData`).
A batch is a tensor, a tuple ``(inputs, target, ...)`` or a dict as Hugging Face models take it (``labels``, when
present, is the target and is not passed to the model). Inputs are called as ``model(x)``, ``model(*x)`` for a
tuple/list or ``model(**x)`` for a dict; of what the model returns, the main tensor counts: the tensor itself,
``.logits`` (or the first tensor) of a dict/ModelOutput, the first element of a tuple.

Two tasks are built in:

- `Classification` (the default): top-1 accuracy against labels; fine-tuning mixes cross-entropy with
  distillation from the uncompressed model (`FinetuneConfig.distill`).
- `Distillation`: no labels at all. The loss is the distance from the uncompressed model's outputs (KL for logits,
  MSE or cosine for embeddings and hidden states) and the metric is how close the outputs stay (cosine
  similarity, or minus the mean squared error).

Example:
    >>> task = Classification()
    >>> model = torch.nn.Linear(4, 3)
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> 0.0 <= task.metric(model, batches) <= 1.0
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zerobit.data.loaders import batches_of
from zerobit.device import model_device, move

Batch = Any  # a tensor, a tuple/list (inputs, target, ...), or a dict of tensors
DISTANCES = ("kl", "mse", "cosine")
EVAL_BATCH = 1000  # examples per batch when a TensorData is scored


def call(model: nn.Module, inputs: Any) -> Any:
    """Run `model` on inputs of any of the accepted forms (tensor, tuple/list, dict)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def main_output(out: Any) -> torch.Tensor:
    """The tensor that counts among what a model returns (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if "logits" in out.keys():
            return out["logits"]
        values = [out[k] for k in out.keys()]
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model returned {type(out).__name__} with no tensor in it; zerobit needs a tensor, a tuple "
                    "or a dict/ModelOutput holding one (e.g. logits)")


def first_tensor(inputs: Any) -> torch.Tensor:
    """The first tensor in inputs of any accepted form (its first dimension is the batch)."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs) \
        if isinstance(inputs, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"inputs of type {type(inputs).__name__} hold no tensor; pass a tensor, a tuple or a dict of "
                    "tensors")


def map_tensors(inputs: Any, fn: Any) -> Any:
    """`inputs` with `fn` applied to every tensor in it (same structure)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(v, fn) for v in inputs)
    return inputs


@dataclass(frozen=True)
class Task:
    """How to run a model on a batch and judge it. Subclass it for other data or other metrics.

    The methods a subclass usually overrides: `split` (batch → inputs, target), `supervised_loss`,
    `distill_loss`, `batch_score` and `fisher_loss`. `needs_reference` says whether judging needs the
    uncompressed model's outputs (then `metric` takes `reference=`).
    """

    needs_reference = False
    name = "task"

    # ---------------------------------------------------------------- batches
    def split(self, batch: Batch) -> tuple[Any, Any]:
        """(inputs, target) of a batch; target is None when the batch has none."""
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return inputs, batch.get("labels")
        if isinstance(batch, (tuple, list)):
            if len(batch) == 1:
                return batch[0], None
            return batch[0], batch[1]
        return batch, None

    def inputs(self, batch: Batch) -> Any:
        return self.split(batch)[0]

    def target(self, batch: Batch) -> Any:
        return self.split(batch)[1]

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """The batch with every tensor on `device` (the one place data crosses devices)."""
        return move(batch, device)

    def batch_size(self, batch: Batch) -> int:
        """Examples in a batch: the first dimension of its first input tensor."""
        return int(first_tensor(self.inputs(batch)).shape[0])

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's main output on the batch (moved to the model's device first)."""
        return main_output(call(model, self.inputs(self.to_device(batch, model_device(model)))))

    # ---------------------------------------------------------------- training
    def supervised_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """The loss against the batch's target; None when the task has no targets."""
        return None

    def distill_loss(self, out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distance of the student's outputs from the teacher's (mean over the batch)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, teacher_out: torch.Tensor | None = None, distill: float = 0.7,
             temperature: float = 2.0) -> torch.Tensor:
        """(1 − distill)·supervised + distill·distillation; only distillation when the task has no targets."""
        out = self.forward(model, batch).float()
        sup = self.supervised_loss(out, batch) if distill < 1 or teacher_out is None else None
        if teacher_out is None or distill == 0:
            if sup is None:
                raise ValueError(f"the {self.name} task has no labels to train on: it needs the uncompressed "
                                 "model as a teacher (FinetuneConfig.distill > 0)")
            return sup
        kd = self.distill_loss(out, teacher_out.float(), temperature)
        return kd if sup is None else (1 - distill) * sup + distill * kd

    def fisher_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """A loss summed over the batch's examples whose squared gradients estimate the Fisher information."""
        raise NotImplementedError

    # ---------------------------------------------------------------- judging
    def batch_score(self, out: torch.Tensor, batch: Batch, reference_out: torch.Tensor | None) -> float:
        """Sum over the batch's examples of the per-example score (higher is better)."""
        raise NotImplementedError

    def divergence(self, out: torch.Tensor, reference_out: torch.Tensor) -> float:
        """Mean distance of outputs from the reference model's (used by search proxies)."""
        return float(self.distill_loss(out.float(), reference_out.float(), 1.0))

    @torch.no_grad()
    def metric(self, model: nn.Module, data: Iterable[Batch], reference: nn.Module | None = None,
               max_examples: int | None = None) -> float:
        """Mean per-example score of `model` on `data` (eval mode; the model's mode is restored).

        Raises:
            ValueError: `data` holds no examples, or the task needs `reference` and none is given.
        """
        if self.needs_reference and reference is None:
            raise ValueError(f"the {self.name} task judges a model against the uncompressed one: pass reference=")
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for batch in batches_of(data, EVAL_BATCH):
                n = self.batch_size(batch)
                ref = self.forward(reference, batch).float() if self.needs_reference else None
                total += self.batch_score(self.forward(model, batch).float(), batch, ref)
                count += n
                if max_examples is not None and count >= max_examples:
                    break
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("cannot score a model on empty data; pass a non-empty split")
        return total / count

    def bind(self, teacher: nn.Module) -> Task:
        """This task with what it needs from the uncompressed model (nothing here; see Distillation)."""
        return self


@dataclass(frozen=True)
class Classification(Task):
    """Class labels: top-1 accuracy; cross-entropy (+ distillation from the teacher at a temperature)."""

    name = "classification"

    def supervised_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(_classes_last(out), self._labels(batch).to(out.device).flatten())

    def distill_loss(self, out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
        return kl_loss(_classes_last(out), _classes_last(teacher_out), temperature)

    def fisher_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(_classes_last(out), self._labels(batch).to(out.device).flatten(), reduction="sum")

    def batch_score(self, out: torch.Tensor, batch: Batch, reference_out: torch.Tensor | None) -> float:
        return float((_classes_last(out).argmax(1).cpu() == self._labels(batch).flatten().cpu()).sum())

    def _labels(self, batch: Batch) -> torch.Tensor:
        target = self.target(batch)
        if not isinstance(target, torch.Tensor):
            raise ValueError("the classification task needs labels: batches (x, y) or dicts with 'labels'. For "
                             "data without labels use compress(..., task=zerobit.Distillation())")
        return target


@dataclass(frozen=True)
class Distillation(Task):
    """No labels: keep the compressed model's outputs close to the uncompressed model's.

    Attributes:
        distance: "kl" for logits (softmax distributions at the fine-tune temperature), "mse" or "cosine" for
            embeddings and hidden states (per example, over all output elements).
        reference: the uncompressed model the metric compares with (set by `compress` via `bind`).

    The metric is the mean cosine similarity of the outputs (for "kl" and "cosine") or minus their mean
    squared error (for "mse"); 1.0 (or 0.0) is a perfect copy.

    Example:
        >>> task = Distillation("cosine").bind(torch.nn.Linear(4, 2))
        >>> task.metric(task.reference, [torch.randn(8, 4)], reference=task.reference)
        1.0
    """

    distance: str = "cosine"
    reference: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    needs_reference = True
    name = "distillation"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"Distillation distance must be one of {DISTANCES}, got {self.distance!r}")

    def bind(self, teacher: nn.Module) -> Distillation:
        return dataclasses.replace(self, reference=teacher)

    def target(self, batch: Batch) -> None:  # labels, if any, are ignored
        return None

    def distill_loss(self, out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
        if self.distance == "kl":
            return kl_loss(_classes_last(out), _classes_last(teacher_out), temperature)
        if self.distance == "mse":
            return F.mse_loss(out, teacher_out)
        return (1 - F.cosine_similarity(out.flatten(1), teacher_out.flatten(1), dim=1)).mean()

    def fisher_loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Labels drawn from the model's own softmax ("kl"; the true Fisher), or the outputs along a random
        Gaussian direction (a Gauss–Newton estimate: E‖Jᵀr‖² = ‖J‖²): at the uncompressed model the distillation
        loss itself has zero gradient, so it cannot rank channels."""
        gen = torch.Generator().manual_seed(0)
        if self.distance == "kl":
            logits = _classes_last(out)
            drawn = torch.multinomial(F.softmax(logits.detach().float().cpu(), 1), 1, generator=gen).flatten()
            return F.cross_entropy(logits, drawn.to(out.device), reduction="sum")
        r = torch.randn(out.shape, generator=gen).to(out.device)
        return (out * r).sum()

    def batch_score(self, out: torch.Tensor, batch: Batch, reference_out: torch.Tensor | None) -> float:
        a, b = out.flatten(1).float(), reference_out.flatten(1).float()
        if self.distance == "mse":
            return -float((a - b).pow(2).mean(1).sum())
        return float(F.cosine_similarity(a, b, dim=1).sum())

    def metric(self, model: nn.Module, data: Iterable[Batch], reference: nn.Module | None = None,
               max_examples: int | None = None) -> float:
        return super().metric(model, data, reference if reference is not None else self.reference, max_examples)


def kl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(teacher ‖ student) of the softmax distributions at temperature T, mean over examples."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def _classes_last(out: torch.Tensor) -> torch.Tensor:
    """Logits as (examples, classes): a (B, T, C) sequence output counts every position as an example."""
    return out.reshape(-1, out.shape[-1]) if out.dim() > 2 else out


DEFAULT_TASK = Classification()


def get_task(task: Task | str | None) -> Task:
    """A Task from an instance, a name ("classification", "distillation") or None (classification)."""
    if task is None:
        return DEFAULT_TASK
    if isinstance(task, Task):
        return task
    if task == "classification":
        return Classification()
    if task == "distillation":
        return Distillation()
    raise ValueError(f"unknown task {task!r}; use 'classification', 'distillation' or a zerobit.Task")
