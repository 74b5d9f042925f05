from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import EXAMPLE, TINY_MODELS

from zerobit.budget import (
    BOPs,
    BudgetError,
    MACs,
    Size,
    bops,
    float_policy,
    macs,
    parse_budget,
    smallest_policy,
)
from zerobit.export.runtime import save_zbit
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, Policy
from zerobit.quant.apply import apply_policy


@pytest.fixture()
def plain_graph():
    return analyse(TINY_MODELS["plain"](), EXAMPLE)


def test_parse_budget_forms():
    assert parse_budget("1/32") == Size(fraction=1 / 32)
    assert parse_budget("40KB") == Size(kilobytes=40.0)
    assert parse_budget("40000B") == Size(bytes=40000)
    assert parse_budget("bops=1/64") == BOPs(fraction=1 / 64)
    assert parse_budget("macs=5M") == MACs(value=5e6)
    for bad in ("forty", "flops=3", "12"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_costs_by_hand(plain_graph):
    g = plain_graph
    p = Policy({"features.0.0": GroupDecision((4,) * 6 + (0,) * 6),
                "features.1.0": GroupDecision((8,) * 8 + (2,) * 8),
                "fc": GroupDecision((8,) * 10)}, act_bits=8)
    conv1 = 6 * 9 * 64
    conv2 = 16 * 6 * 9 * 16
    assert macs(g, p) == conv1 + conv2 + 160
    expected_bops = 8 * (conv1 * 4 + (8 * 8 + 8 * 2) * 6 * 9 * 16 + 160 * 8)
    assert bops(g, p) == expected_bops
    assert bops(g, float_policy(g)) == 32 * 32 * g.macs
    assert MACs(fraction=0.5).limit(g) == g.macs / 2


def test_impossible_budget_names_the_smallest(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    smallest = smallest_policy(graph)
    assert [d.kept for d in smallest.groups.values()] == [1, 1, 10]  # the output layer keeps its 10 channels
    # the floor the error names is the size of the file the smallest policy really writes
    path = tmp_path / "smallest.zbit"
    written = save_zbit(apply_policy(model, graph, smallest, EXAMPLE), graph, smallest, path)
    floor = os.path.getsize(path)
    assert written == floor == Size(bytes=1).cost(graph, smallest)
    with pytest.raises(BudgetError, match=f"smallest achievable is {floor:,}"):
        Size(bytes=floor - 1).check_feasible(graph, act_bits=8)
    Size(bytes=floor).check_feasible(graph, act_bits=8)
    # kept channels rounded to multiples of 8: at least 8 of every prunable group (12 and 16 channels here)
    aligned = smallest_policy(graph, multiple=8)
    assert [d.kept for d in aligned.groups.values()] == [8, 8, 10]
    with pytest.raises(BudgetError, match=r"8 channels \(or all of a smaller group; channel_multiple=8\) per group"):
        Size(bytes=floor).check_feasible(graph, act_bits=8, multiple=8)


def test_size_needs_exactly_one_value():
    with pytest.raises(ValueError):
        Size()
    with pytest.raises(ValueError):
        Size(bytes=10, fraction=0.5)
    with pytest.raises(ValueError):
        BOPs(value=-1)


def test_size_fraction_is_of_fp32_file(tmp_path):
    model = TINY_MODELS["plain"]()
    graph = analyse(model, EXAMPLE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "fp32.safetensors")
    fp32_file = os.path.getsize(tmp_path / "fp32.safetensors")
    assert Size(fraction=0.25).limit(graph) == fp32_file / 4
    assert parse_budget("1/4").limit(graph) == fp32_file / 4
    assert Size(fraction=0.25).reference(graph) == fp32_file
