"""Channels that unstructured sparsity empties in every coupled layer leave the model for real."""

from __future__ import annotations

import os

import torch
from tiny_models import EXAMPLE, TINY_MODELS

from zerobit.export.runtime import load, save_zbit
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, LayerDecision, Policy
from zerobit.quant.apply import apply_policy, drop_empty_channels
from zerobit.train.calibrate import calibrate_activations


def test_empty_channels_are_removed_and_the_file_is_exact(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]().eval()
    with torch.no_grad():  # three channels of the first conv far smaller than the rest: 50% sparsity empties them
        model.features[0][0].weight[[1, 4, 7]] *= 1e-4
    graph = analyse(model, EXAMPLE)
    policy = Policy({n: GroupDecision((4,) * g.channels) for n, g in graph.groups.items()},
                    layers={"features.0.0": LayerDecision(0.3), "features.1.0": LayerDecision(0.5)})
    emptied, start = drop_empty_channels(model, graph, policy, EXAMPLE)
    assert [i for i, b in enumerate(emptied["features.0.0"].bits) if b == 0] == [1, 4, 7]
    assert emptied["features.1.0"] == policy["features.1.0"]  # no channel of it was empty
    assert emptied.layer("features.0.0").sparsity < 0.3  # the zeros that left with the channels no longer count
    assert estimate_bytes(graph, emptied) < estimate_bytes(graph, policy)
    q = apply_policy(start, graph, emptied, EXAMPLE)
    w = q.get_submodule("features.0.0").deploy().weight
    assert w.shape[0] == 9 and bool((w.flatten(1).abs().sum(1) > 0).all())
    calibrate_activations(q, [(torch.randn(16, 1, 8, 8), None)])
    path = tmp_path / "m.zbit"
    assert save_zbit(q, graph, emptied, path) == os.path.getsize(path) == estimate_bytes(graph, emptied)
    loaded = load(path, TINY_MODELS["plain"]())
    assert loaded.features[0][0].out_channels == 9 and loaded.features[1][0].in_channels == 9
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_nothing_changes_without_empty_channels():
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    policy = Policy({n: GroupDecision((4,) * g.channels) for n, g in graph.groups.items()},
                    layers={"features.1.0": LayerDecision(0.5)})
    emptied, start = drop_empty_channels(model, graph, policy, EXAMPLE)
    assert emptied == policy and start is model
