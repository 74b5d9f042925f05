"""OPQ and ADMM on tiny models: budget met by the written file, export parity, allocation follows the budget."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.budget import BudgetError, MACs, Size
from zerobit.graph import analyse
from zerobit.importance import group_scores
from zerobit.strategies import ADMM, OPQ, Problem
from zerobit.strategies.opq import pruning_error, quantization_error
from zerobit.train.evaluate import predictions
from zerobit.train.finetune import FinetuneConfig, finetune


def problem_for(model, digits, budget, epochs=0.0):
    graph = analyse(model, EXAMPLE)
    return Problem(model, graph, budget, EXAMPLE, digits.train, digits.val, group_scores(model, graph),
                   finetune=FinetuneConfig(epochs=epochs), progress=False)


def test_laplace_formulas_match_sampled_weights():
    rng = np.random.default_rng(0)
    w = rng.laplace(scale=1.0, size=400_000)
    for p in (0.2, 0.5, 0.8):
        t = np.quantile(np.abs(w), p)
        sampled = np.mean(np.where(np.abs(w) <= t, w, 0.0) ** 2)
        assert sampled == pytest.approx(pruning_error(np.array(p)), rel=0.03)
    assert quantization_error(np.array(0.0), 8) < quantization_error(np.array(0.0), 4) < quantization_error(
        np.array(0.0), 2)


def test_opq_allocation_follows_the_budget(trained_residual, digits):
    stored = []
    for fraction in (1 / 3, 1 / 5, 1 / 7):
        prob = problem_for(trained_residual, digits, Size(fraction=fraction))
        found = OPQ().search(prob)
        assert prob.cost(found.policy) <= prob.limit
        everything = all(d.bits[0] == 8 for d in found.policy.groups.values()) and all(d.sparsity == 0 for d in found.policy.layers.values())
        assert everything or prob.cost(found.policy) >= 0.9 * prob.limit  # the greedy fill spends the rest
        bits = sum(d.kept * d.kept_bits()[0] for d in found.policy.groups.values())
        density = np.mean([1 - found.policy.layer(n).sparsity for n in prob.graph.layers])
        stored.append(bits * density)
    assert stored[0] > stored[1] > stored[2]


def test_opq_masks_and_steps_stay_frozen(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 7), epochs=1.0)
    found = OPQ().search(prob)
    sparsest = max(found.policy.layers, key=lambda n: found.policy.layer(n).sparsity)
    layer = found.model.get_submodule(sparsest)
    mask, step = layer.mask.clone(), layer.fixed_scale.clone()
    finetune(found.model, digits.train, FinetuneConfig(epochs=1), progress=False)
    assert torch.equal(layer.mask, mask) and torch.equal(layer.fixed_scale, step)
    assert bool((layer.deploy().weight[mask == 0] == 0).all())


def test_opq_refuses_macs_and_too_small(trained_residual, digits):
    with pytest.raises(BudgetError, match="MACs"):
        OPQ().search(problem_for(trained_residual, digits, MACs(fraction=0.5)))
    with pytest.raises(BudgetError, match="OPQ cannot meet"):
        OPQ(max_sparsity=0.5).search(problem_for(trained_residual, digits, Size(fraction=1 / 9)))


@pytest.mark.parametrize("strategy", ["opq", "admm"])
def test_written_file_meets_budget_and_loads_exactly(tmp_path, trained_residual, digits, strategy):
    budget = Size(fraction=1 / 6)
    result = zb.compress(trained_residual, EXAMPLE, budget, strategy, train_data=digits.train,
                         eval_data=digits.val, test_data=digits.test,
                         finetune_config=FinetuneConfig(epochs=4, lr=0.02), progress=False)
    path = tmp_path / "m.zbit"
    written = zb.save(result, path)
    assert written == os.path.getsize(path) == result.file_bytes <= budget.limit(result.graph)
    loaded = zb.load(path, TINY_MODELS["residual"]())
    assert torch.equal(predictions(loaded, digits.test), predictions(result.model, digits.test))
    assert result.accuracy > 0.85
    assert any(d.sparsity > 0 for d in result.policy.layers.values())


def test_admm_uses_codebooks_and_less_budget_means_more_zeros(trained_residual, digits):
    densities = []
    for fraction in (1 / 3, 1 / 5):
        prob = problem_for(trained_residual, digits, Size(fraction=fraction), epochs=1.0)
        found = ADMM(iterations=2).search(prob)
        assert prob.cost(found.policy) <= prob.limit
        assert all(d.codebook for d in found.policy.layers.values())
        densities.append(sum(1 - d.sparsity for d in found.policy.layers.values()))
    assert densities[0] > densities[1]


def test_admm_refuses_non_size_budgets(trained_residual, digits):
    with pytest.raises(BudgetError, match="Size budget"):
        ADMM().search(problem_for(trained_residual, digits, MACs(fraction=0.5)))


def test_admm_removes_empty_channels_physically(trained_plain, digits, tmp_path):
    # 1/10 of the fp32 file is tight enough that whole channels of both hidden groups lose every weight
    result = zb.compress(trained_plain, EXAMPLE, Size(fraction=1 / 10), ADMM(iterations=2), train_data=digits.train,
                         eval_data=digits.val, finetune_config=FinetuneConfig(epochs=1.0), progress=False)
    kept = {name: d.kept for name, d in result.policy.groups.items()}
    assert kept["features.0.0"] < 12 and kept["features.1.0"] < 16 and kept["fc"] == 10
    path = tmp_path / "m.zbit"
    assert zb.save(result, path) == os.path.getsize(path) == result.file_bytes
    loaded = zb.load(path, TINY_MODELS["plain"]())
    # gone from the rebuilt model, not just zero: producers lose outputs, consumers the matching inputs
    assert loaded.get_submodule("features.0.0").weight.shape == (kept["features.0.0"], 1, 3, 3)
    assert loaded.get_submodule("features.1.0").weight.shape == (kept["features.1.0"], kept["features.0.0"], 3, 3)
    assert loaded.get_submodule("fc").weight.shape == (10, kept["features.1.0"])
    assert torch.equal(predictions(loaded, digits.test), predictions(result.model, digits.test))


class OneChannel(torch.nn.Module):
    """A conv with a single output channel: nothing to prune there, only bits to choose."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("strategy", ["uniform", "opq", "admm"])
def test_layer_too_small_to_prune_keeps_its_channel(digits, strategy, tmp_path):
    torch.manual_seed(0)
    model = OneChannel().eval()
    result = zb.compress(model, EXAMPLE, Size(fraction=1 / 4), strategy, train_data=digits.train,
                         eval_data=digits.val, finetune_config=FinetuneConfig(epochs=0.5), progress=False)
    assert result.policy["conv"].bits[0] > 0  # its one channel is kept, at some bit-width
    path = tmp_path / "m.zbit"
    zb.save(result, path)
    assert os.path.getsize(path) == result.file_bytes <= Size(fraction=1 / 4).limit(result.graph)
    loaded = zb.load(path, OneChannel())
    assert torch.equal(predictions(loaded, digits.test), predictions(result.model, digits.test))


def test_admm_below_its_minimum_is_refused(trained_residual, digits):
    from zerobit.budget import smallest_policy

    graph = analyse(trained_residual, EXAMPLE)
    floor = Size(bytes=1).cost(graph, smallest_policy(graph))  # reachable by channel pruning, not by ADMM
    prob = problem_for(trained_residual, digits, Size(bytes=int(floor) + 10), epochs=0.5)
    # refused before any work: below what every channel's scales, biases and other tensors take, ADMM (which keeps
    # channels) could only empty channels wholesale — a dead network (ViT at 1/32: 10% accuracy)
    with pytest.raises(BudgetError, match="ADMM keeps every channel.*uniform, sequential"):
        ADMM(iterations=1).search(prob)
