"""Sequential baseline ("deep compression"): prune, fine-tune, then quantize; fine-tune again afterwards."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zerobit.data.loaders import batches_of
from zerobit.graph.emptying import groups_to_empty, name_list
from zerobit.policy import FLOAT_BITS
from zerobit.quant.apply import apply_policy, set_policy_bits
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy
from zerobit.strategies.uniform import final_uniform, solve_uniform
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm
from zerobit.train.finetune import finetune


@register_strategy
@dataclass(frozen=True)
class Sequential(Strategy):
    """Magnitude channel pruning → fine-tune → uniform quantization (→ the final fine-tune of `compress`).

    Keep-ratio and bits are chosen as by `Uniform`; `prune_share` of the shared fine-tune budget is spent
    after pruning (in float), the rest after quantization.

    Example:
        >>> # zerobit.compress(model, x, budget=Size(fraction=1/32), strategy="sequential", ...)
    """

    bits: int | None = None
    min_keep: float = 0.7
    prune_share: float = 0.5
    empty: tuple[str, ...] = ()  # residual branches removed whole first, as `Uniform(empty=...)`
    name = "sequential"

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty", name_list(self.empty))

    def search(self, problem: Problem) -> SearchResult:
        empty = tuple(groups_to_empty(problem.graph.groups, self.empty))
        keep, bits = solve_uniform(problem, self.bits, self.min_keep, empty)
        pruned = replace(final_uniform(problem, keep, bits, empty).with_bits(FLOAT_BITS), act_bits=FLOAT_BITS,
                         act={})
        model = apply_policy(problem.model, problem.graph, pruned, problem.example_inputs)
        recalibrate_batchnorm(model, batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed),
                              task=problem.task)
        epochs = problem.finetune.epochs * self.prune_share
        finetune(model, problem.train_data, problem.finetune, teacher=problem.model, progress=problem.progress,
                 epochs=epochs, task=problem.task)
        final = replace(pruned.with_bits(bits), act_bits=problem.act_bits)
        set_policy_bits(model, problem.graph, final)
        # the quantized weights (2 bits at 1/128) shift every BatchNorm's input: stale statistics left the
        # model at chance (10%) and the fine-tune recovered only to 37% at 1/128
        calibrate_activations(model, batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed),
                              task=problem.task)
        recalibrate_batchnorm(model, batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed),
                              task=problem.task)
        return SearchResult(final, model, finetune_epochs_used=epochs,
                            info={"keep": keep, "bits": bits} | ({"emptied": list(empty)} if empty else {}))
