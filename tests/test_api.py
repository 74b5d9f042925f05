from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.policy import uniform_policy
from zerobit.train.evaluate import accuracy, predictions


def run(model, digits, budget, strategy="uniform", epochs=4.0, seed=0):
    return zb.compress(model, EXAMPLE, budget, strategy, train_data=digits.train, eval_data=digits.val,
                       test_data=digits.test, finetune_config=zb.FinetuneConfig(epochs=epochs, seed=seed, lr=0.02),
                       progress=False)


@pytest.mark.parametrize("strategy", ["uniform", "sequential"])
def test_compress_end_to_end(tmp_path, trained_residual, digits, strategy):
    budget = zb.Size(fraction=1 / 6)
    result = run(trained_residual, digits, budget, strategy)
    path = tmp_path / "m.zbit"
    written = zb.save(result, path)
    limit = budget.limit(result.graph)
    assert written == os.path.getsize(path) <= limit
    assert result.file_bytes == written
    loaded = zb.load(path, TINY_MODELS["residual"]())
    assert torch.equal(predictions(loaded, digits.test), predictions(result.model, digits.test))
    assert accuracy(loaded, digits.test) == result.accuracy
    assert result.baseline_accuracy > 0.9
    assert result.accuracy > 0.6  # compressed 6×, 4 short epochs on 1,200 images: 6× chance on any CPU
    d = result.to_dict()
    assert d["ratio"] >= 6 and d["bops"] < d["fp32_bops"] and "fp32" in result.summary()


def test_finetune_recovers_accuracy(trained_plain, digits):
    budget = zb.Size(fraction=1 / 10)
    before = run(trained_plain, digits, budget, epochs=0.0).accuracy
    after = run(trained_plain, digits, budget, epochs=3.0).accuracy
    assert after > before


def test_seeded_runs_are_reproducible(trained_plain, digits):
    a = run(trained_plain, digits, zb.Size(fraction=1 / 5), epochs=0.5, seed=3)
    b = run(trained_plain, digits, zb.Size(fraction=1 / 5), epochs=0.5, seed=3)
    assert a.policy == b.policy and a.accuracy == b.accuracy
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@dataclasses.dataclass(frozen=True)
class HalfRateUniform(zb.strategies.Uniform):
    """Uniform, asking the final fine-tune for half the configured learning rate (as SBS's final_lr does)."""

    def search(self, problem):
        return dataclasses.replace(super().search(problem), finetune_lr=0.5)


def test_a_strategy_sets_the_final_finetunes_learning_rate(trained_plain, digits):
    budget = zb.Size(fraction=1 / 5)
    config = dict(train_data=digits.train, eval_data=digits.val, progress=False)
    half = zb.compress(trained_plain, EXAMPLE, budget, HalfRateUniform(), **config,
                       finetune_config=zb.FinetuneConfig(epochs=0.5, lr=0.04, seed=3))
    same = zb.compress(trained_plain, EXAMPLE, budget, "uniform", **config,
                       finetune_config=zb.FinetuneConfig(epochs=0.5, lr=0.02, seed=3))
    full = zb.compress(trained_plain, EXAMPLE, budget, "uniform", **config,
                       finetune_config=zb.FinetuneConfig(epochs=0.5, lr=0.04, seed=3))
    a, b, c = (r.model.state_dict() for r in (half, same, full))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_compress_leaves_the_callers_random_stream_alone(trained_plain, digits):
    """Another pipeline in the same process draws the same numbers with or without a compress in between (the
    fine-tune seeds itself; before, it reseeded the caller's global generator)."""
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    run(trained_plain, digits, zb.Size(fraction=1 / 5), epochs=0.25, seed=3)
    assert torch.equal(torch.rand(5), expected)


def test_quiet_exports_give_back_the_callers_logging_level():
    import logging

    from zerobit.export.onnx_file import quiet

    logging.disable(logging.CRITICAL)
    try:
        with quiet():
            assert logging.root.manager.disable >= logging.WARNING
        assert logging.root.manager.disable == logging.CRITICAL  # not reset to NOTSET
    finally:
        logging.disable(logging.NOTSET)


def test_impossible_budget_refused_before_any_work(trained_plain, digits):
    with pytest.raises(zb.BudgetError, match="smallest achievable"):
        run(trained_plain, digits, zb.Size(bytes=100))


def test_bops_budget(trained_residual, digits):
    budget = zb.BOPs(fraction=1 / 40)
    result = run(trained_residual, digits, budget, epochs=0.5)
    assert result.to_dict()["bops"] <= budget.limit(result.graph)


def test_nan_weights_are_refused(digits):
    model = TINY_MODELS["plain"]().eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        run(model, digits, zb.Size(fraction=1 / 4))


def test_wrong_types(trained_plain, digits):
    with pytest.raises(TypeError, match="budget"):
        run(trained_plain, digits, 1000)


def test_a_model_that_turned_non_finite_is_never_reported():
    """NaN that only shows in eval mode (a BatchNorm whose running variance went bad) raises, naming the layer."""
    from zerobit.api import _check_finite
    from zerobit.graph import analyse
    from zerobit.quant import apply_policy

    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    q = apply_policy(model, graph, zb.Policy({n: zb.GroupDecision((8,) * g.channels)
                                              for n, g in graph.groups.items()}), EXAMPLE)
    _check_finite(q)  # healthy
    q.get_submodule("features.1.0").bn.running_var[3] = -1.0
    with pytest.raises(FloatingPointError, match="features.1.0: weights, scales"):
        _check_finite(q)


@pytest.mark.parametrize("strategy", ["uniform", "sbs"])
def test_channel_multiple(tmp_path, trained_plain, digits, strategy):
    """Kept widths are multiples of 4 (uniform searches over them; SBS's policy is rounded after its search),
    the file meets the budget and loads back to the model measured."""
    budget = zb.Size(fraction=1 / 8)
    result = zb.compress(trained_plain, EXAMPLE, budget, strategy, train_data=digits.train, eval_data=digits.val,
                         finetune_config=zb.FinetuneConfig(epochs=0.5, lr=0.02), progress=False, channel_multiple=4)
    kept = {n: result.policy[n].kept for n, g in result.graph.groups.items() if g.prunable}
    assert kept and all(k % 4 == 0 for k in kept.values()), kept
    assert zb.save(result, tmp_path / "m.zbit") <= budget.limit(result.graph)
    loaded = zb.load(tmp_path / "m.zbit", TINY_MODELS["plain"]())
    assert torch.equal(predictions(loaded, digits.val), predictions(result.model, digits.val))
    assert loaded.features[0][0].out_channels == kept["features.0.0"]


def test_channel_multiple_is_checked(trained_plain, digits):
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="channel_multiple"):
            zb.compress(trained_plain, EXAMPLE, zb.Size(fraction=1 / 8), train_data=digits.train,
                        eval_data=digits.val, progress=False, channel_multiple=bad)
    with pytest.raises(zb.BudgetError, match="channel_multiple=16"):  # 16 keeps every channel: nothing fits
        zb.compress(trained_plain, EXAMPLE, zb.Size(fraction=1 / 8), "uniform", train_data=digits.train,
                    eval_data=digits.val, progress=False, channel_multiple=16)


@dataclasses.dataclass(frozen=True)
class FreeWidths(zb.strategies.Strategy):
    """A strategy whose policies keep free widths (0.45 of each group at 4 bits) and that answers a tighter
    budget by a retarget, as SBS projects its trained gates; `calls` records the limits it answered."""

    calls: list = dataclasses.field(default_factory=list)
    name = "free-widths"

    def search(self, problem):
        def answer(target):
            self.calls.append(target.limit)
            return zb.strategies.SearchResult(uniform_policy(target.graph, target.scores, 0.45, 4), retarget=answer)
        return answer(problem)


def test_rounding_to_a_channel_multiple_keeps_the_strategys_retarget(trained_plain, digits):
    """A policy rounded to multiples of 4 after the search still answers a tighter budget by the strategy's own
    retarget (no new search), and that answer is rounded too."""
    from zerobit.api import _search
    from zerobit.importance import group_scores

    graph = zb.analyse(trained_plain, EXAMPLE)
    problem = zb.strategies.Problem(trained_plain, graph, zb.Size(fraction=1 / 3), EXAMPLE, digits.train,
                                    digits.val, group_scores(trained_plain, graph), progress=False,
                                    channel_multiple=4)
    strategy = FreeWidths()
    found = _search(strategy, problem)
    tighter = dataclasses.replace(problem, budget=zb.Size(fraction=1 / 4))
    again = _search(strategy, tighter, previous=found)
    assert found.info["aligned_groups"] > 0 and found.retarget is not None
    assert strategy.calls == [problem.limit, tighter.limit]  # the second answer came from the retarget
    for policy in (found.policy, again.policy):
        assert all(policy[n].kept % 4 == 0 for n, g in graph.groups.items() if g.prunable)
