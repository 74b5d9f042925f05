"""The cheap evaluation a search scores candidate policies with (AJPQ's reward).

A candidate is applied for real (0-bit channels removed, so small policies evaluate fast), its BatchNorm
statistics are re-estimated on a few training batches, optionally a few QAT steps follow, and it is scored on a
fixed slice of the validation split: top-1 accuracy and the KL divergence from the uncompressed model's outputs.
Where the device runs bfloat16 natively (CUDA, CPUs with AMX; see zerobit.device) all of this runs under bfloat16
autocast by default: ~1.6× faster on ResNet-20 search policies with AMX, scores within 0.4 points of float32
(BENCHMARKS.md); the fake-quantized weights and 8-bit activation codes are exact in bfloat16, only products and
sums round more coarsely. (On CPUs with AVX512-BF16 but no AMX, bfloat16 measured ~10× slower: float32 there.)
`bench/ajpq_proxy.py` measures how well each setting ranks policies by their accuracy after a real fine-tune.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from zerobit.data.loaders import batches_of, take_examples
from zerobit.device import PRECISIONS, autocast, autocast_dtype, model_device
from zerobit.policy import GroupDecision, Policy
from zerobit.quant.apply import apply_policy, quant_layers, wrap_layers
from zerobit.strategies.base import Problem
from zerobit.task import Task
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm
from zerobit.train.finetune import FinetuneConfig, finetune

METRICS = ("accuracy", "kl")


@dataclass(frozen=True)
class ProxyConfig:
    """How a candidate policy is scored.

    Attributes:
        recovery_batches: training batches the BatchNorm statistics are re-estimated on.
        batch_size: images per recovery / fine-tune batch.
        finetune_steps: QAT steps (labels only, no augmentation, SGD at `lr`) after the BatchNorm re-estimation.
        lr: learning rate of those steps.
        samples: validation images scored (always the same ones).
        metric: "accuracy" → reward 0.1·(acc − reference acc) in % points; "kl" → reward −KL(reference ‖ candidate).
        precision: "float32", "bfloat16" (autocast) or "auto" = bfloat16 where the device runs it natively.
    """

    recovery_batches: int = 10
    batch_size: int = 128
    finetune_steps: int = 0
    lr: float = 0.01
    samples: int = 1000
    metric: str = "accuracy"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if (self.metric not in METRICS or self.precision not in PRECISIONS or self.samples < 1
                or self.recovery_batches < 0 or self.finetune_steps < 0):
            raise ValueError(f"invalid ProxyConfig {self}: metric must be one of {METRICS}, precision one of "
                             f"{PRECISIONS}, samples ≥ 1, recovery_batches and finetune_steps ≥ 0")

    def dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype this config scores in on `device` ("auto" resolved by zerobit.device)."""
        return autocast_dtype(device, self.precision)


@dataclass
class ProxyReference:
    """What every candidate is compared with: the unpruned model at 8 bits, scored on the config's slice."""

    ranges: dict[str, dict]  # calibrated activation quantizer state per layer (of the unpruned model)
    outputs: list[torch.Tensor]  # per batch of `batches`, on the CPU
    accuracy: float  # the task's metric in % (top-1 accuracy for classification)
    batches: list = field(default_factory=list, repr=False)  # the validation slice, always the same batches


def proxy_reference(problem: Problem, config: ProxyConfig, seed: int = 0,
                    ranges: dict[str, dict] | None = None) -> ProxyReference:
    """Calibrate activation ranges once on the unpruned 8-bit model (unless `ranges` are given) and score it.

    The reference is measured exactly as candidates are: the same fake-quant layers, the same BatchNorm
    re-estimation (and QAT steps), the same precision. (Measured another way, the reference moved with the
    CPU: a model whose running statistics lag its weights gains 3 points from the re-estimation alone.)
    """
    graph = problem.graph
    full = Policy({n: GroupDecision((8,) * g.channels) for n, g in graph.groups.items()}, problem.act_bits)
    model = wrap_layers(copy.deepcopy(problem.model).eval(), graph, full)
    if ranges is None:
        calibrate_activations(model, batches_of(problem.train_data, 256, shuffle=True, seed=seed), 4,
                              task=problem.task)
        ranges = {n: q.act.state_dict() for n, q in quant_layers(model).items()}
    val = take_examples(problem.val_data, config.samples)
    out = _recover_and_score(problem, model, ranges, config, seed, val)
    return ProxyReference(ranges, out, 100 * _score(problem.task, out, val, out), val)


def _recover_and_score(problem: Problem, model: nn.Module, ranges: dict[str, dict], config: ProxyConfig,
                       seed: int, val: list) -> list[torch.Tensor]:
    """Outputs on the validation slice `val` (per batch, on the CPU) after the cheap recovery of an applied model."""
    for name, q in quant_layers(model).items():
        q.act.load_state_dict(ranges[name])
    batches = batches_of(problem.train_data, config.batch_size, shuffle=True, seed=seed)
    with autocast(model_device(model), config.precision):
        recalibrate_batchnorm(model, batches, config.recovery_batches, task=problem.task)
        if config.finetune_steps:
            label_free = problem.task.needs_reference  # no labels: the steps distil from the original model
            ft = FinetuneConfig(lr=config.lr, batch_size=config.batch_size, distill=float(label_free), seed=seed,
                                augment=False, precision=config.precision)
            finetune(model, problem.train_data, ft, teacher=problem.model if label_free else None, progress=False,
                     steps=config.finetune_steps, task=problem.task)
        model.eval()
        with torch.no_grad():
            return [problem.task.forward(model, b).float().cpu() for b in val]


def _score(task: Task, outputs: list[torch.Tensor], val: list, reference: list[torch.Tensor]) -> float:
    total = sum(task.batch_score(o, b, r) for o, b, r in zip(outputs, val, reference, strict=True))
    return total / max(1, sum(task.batch_size(b) for b in val))


def proxy_scores(problem: Problem, reference: ProxyReference, policy: Policy, config: ProxyConfig,
                 seed: int = 0) -> dict[str, float]:
    """The task's metric (%, "accuracy") and divergence from the reference's outputs ("kl": KL for classification)
    of `policy` after the cheap recovery; `seed` picks the batches."""
    model = apply_policy(problem.model, problem.graph, policy, problem.example_inputs)
    out = _recover_and_score(problem, model, reference.ranges, config, seed, reference.batches)
    task = problem.task
    return {"accuracy": 100 * _score(task, out, reference.batches, reference.outputs),
            "kl": task.divergence(torch.cat([o.flatten(0, -2) if o.dim() > 2 else o for o in out]),
                                  torch.cat([o.flatten(0, -2) if o.dim() > 2 else o for o in reference.outputs]))}


def proxy_reward(scores: dict[str, float], reference: ProxyReference, metric: str) -> float:
    """The reward of one candidate's scores (see ProxyConfig.metric)."""
    if metric == "accuracy":
        return 0.1 * (scores["accuracy"] - reference.accuracy)
    return -scores["kl"]
