from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EXAMPLE

from zerobit.budget import BOPs, MACs, Size, bops, macs
from zerobit.data.loaders import batches_of
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import analyse
from zerobit.importance import group_scores
from zerobit.policy import uniform_policy
from zerobit.strategies import Problem, Sequential, Uniform, get_strategy
from zerobit.strategies.uniform import UNIFORM_BITS
from zerobit.train.calibrate import recalibrate_batchnorm
from zerobit.train.finetune import FinetuneConfig


def problem_for(model, digits, budget, epochs=0.0):
    graph = analyse(model, EXAMPLE)
    return Problem(model, graph, budget, EXAMPLE, digits.train, digits.val, group_scores(model, graph),
                   finetune=FinetuneConfig(epochs=epochs), progress=False)


def test_loose_budget_keeps_every_channel_at_8_bits(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 2))
    found = Uniform().search(prob)
    assert found.info == {"keep": 1.0, "bits": 8}
    assert all(d.bits == (8,) * d.channels for d in found.policy.groups.values())
    assert estimate_bytes(prob.graph, found.policy) <= prob.limit


@pytest.mark.parametrize("fraction", [1 / 6, 1 / 8, 1 / 12])
def test_uniform_meets_size_budget_and_is_tight(trained_residual, digits, fraction):
    prob = problem_for(trained_residual, digits, Size(fraction=fraction))
    found = Uniform().search(prob)
    assert estimate_bytes(prob.graph, found.policy) <= prob.limit
    keep, bits = found.info["keep"], found.info["bits"]
    assert keep < 1.0  # these budgets force pruning
    # least pruning: the next keep-ratio keeps one more channel per group, and that no longer fits
    bigger = uniform_policy(prob.graph, prob.scores, keep + 1e-6, bits)
    assert sum(d.kept for d in bigger.groups.values()) > sum(d.kept for d in found.policy.groups.values())
    assert estimate_bytes(prob.graph, bigger) > prob.limit
    # highest bits: every wider bit-width misses the budget even at the minimum keep-ratio
    for wider in (b for b in UNIFORM_BITS if b > bits):
        assert estimate_bytes(prob.graph, uniform_policy(prob.graph, prob.scores, Uniform().min_keep, wider)) > (
            prob.limit)


def test_tighter_budget_means_fewer_bits_or_channels(trained_plain, digits):
    results = []
    for fraction in (1 / 3, 1 / 6, 1 / 9):
        found = Uniform().search(problem_for(trained_plain, digits, Size(fraction=fraction)))
        total_bits = sum(sum(d.kept_bits()) for d in found.policy.groups.values())
        results.append(total_bits)
    assert results[0] > results[1] > results[2]


@pytest.mark.parametrize("budget_cls,cost", [(BOPs, bops), (MACs, macs)])
def test_uniform_meets_bops_and_macs(trained_residual, digits, budget_cls, cost):
    prob = problem_for(trained_residual, digits, budget_cls(fraction=1 / 20 if budget_cls is BOPs else 1 / 2))
    found = Uniform().search(prob)
    assert cost(prob.graph, found.policy) <= prob.limit
    assert found.policy["stem.0"].kept < 8 and found.info["bits"] == 8  # both budgets are met by pruning alone
    bigger = uniform_policy(prob.graph, prob.scores, found.info["keep"] + 1e-6, 8)  # one more channel per group
    assert bigger["stem.0"].kept == found.policy["stem.0"].kept + 1 and cost(prob.graph, bigger) > prob.limit


def test_fixed_bits(trained_plain, digits):
    found = Uniform(bits=4).search(problem_for(trained_plain, digits, Size(fraction=1 / 4)))
    assert {b for d in found.policy.groups.values() for b in d.kept_bits()} == {4}


def test_sequential_prunes_then_quantizes(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 6), epochs=1.0)
    found = Sequential().search(prob)
    assert found.model is not None and found.finetune_epochs_used == pytest.approx(0.5)
    assert estimate_bytes(prob.graph, found.policy) <= prob.limit
    assert found.policy == Uniform().search(prob).policy  # same allocation rule, staged training
    layer = found.model.get_submodule("stem.0")
    assert int(layer.bits.max()) == found.info["bits"]
    # its BatchNorm statistics are of the quantized weights, not the float ones it was pruned and trained with
    fresh = copy.deepcopy(found.model)
    recalibrate_batchnorm(fresh, batches_of(digits.train, 256, shuffle=True, seed=prob.finetune.seed))
    for (name, bn), (_, want) in zip(bns(found.model), bns(fresh), strict=True):
        torch.testing.assert_close(bn.running_var, want.running_var, msg=name)


def bns(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_registry():
    assert isinstance(get_strategy("sequential"), Sequential)
    with pytest.raises(ValueError, match="available"):
        get_strategy("nope")


def test_nested_options_set_fields_of_a_strategy_config():
    ajpq = get_strategy("ajpq", **{"episodes": 7, "proxy.metric": "kl", "proxy.samples": 200, "space.chunk": 4})
    assert (ajpq.episodes, ajpq.proxy.metric, ajpq.proxy.samples, ajpq.space.chunk) == (7, "kl", 200, 4)
    assert ajpq.proxy.recovery_batches == 10  # the other fields keep their defaults
    with pytest.raises(ValueError, match="no option 'metrc'"):
        get_strategy("ajpq", **{"proxy.metrc": "kl"})
    with pytest.raises(ValueError, match="no option bitz"):
        get_strategy("uniform", bitz=3)
    with pytest.raises(ValueError, match="metric"):
        get_strategy("ajpq", **{"proxy.metric": "loss"})
