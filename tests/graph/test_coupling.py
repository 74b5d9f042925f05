"""Couplings zerobit keeps exact by not pruning them: grouped convs, broadcast gates; folding reused layers."""

from __future__ import annotations

import copy

import pytest
import torch
from models_elsewhere import GroupedNet, ReusedNet, SpatialGateNet

from zerobit.budget import float_policy, macs, smallest_policy
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, Policy
from zerobit.quant.apply import prune_structure

X = torch.zeros(1, 1, 16, 16)


def test_grouped_convs_tie_the_channels_around_them():
    graph = analyse(GroupedNet().eval(), X)
    ties = {n: (g.prunable, g.tie) for n, g in graph.groups.items()}
    # stem feeds g2 (groups=2) and g2 writes 2 groups; wide feeds g4 (groups=4) and g4 writes 4 groups
    assert ties == {"stem.0": (True, 2), "g2.0": (True, 2), "mid.0": (True, 1), "wide.0": (True, 4),
                    "g4.0": (True, 4), "fc": (False, 1)}
    assert graph.layers["g4.0"].weights_per_channel == 32 // 4 * 9
    untied = Policy({n: GroupDecision((4, 0) + (4,) * (g.channels - 2) if g.prunable else (4,) * g.channels)
                     for n, g in graph.groups.items()})
    with pytest.raises(ValueError, match="tied in 2 blocks of 16"):
        untied.validate(graph)
    smallest = smallest_policy(graph)
    assert smallest["wide.0"].bits == (2, 0, 0, 0, 0, 0, 0, 0) * 4
    pruned = prune_structure(GroupedNet().eval(), graph, smallest, X)
    assert pruned.mid[0].out_channels == 1 and pruned.wide[0].out_channels == 4
    assert pruned.g2[0].weight.shape == (2, 1, 3, 3) and pruned.g4[0].weight.shape == (4, 1, 3, 3)
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_tied_channels_keep_the_grouped_conv_exact():
    """Removing channel i of every block equals zeroing those channels in the unpruned model."""
    torch.manual_seed(0)
    model = GroupedNet().eval()
    graph = analyse(model, X)
    groups = {}
    for n, g in graph.groups.items():
        block = tuple(0 if i in (1, 3) and g.prunable and g.tie > 1 else 8 for i in range(g.block))
        groups[n] = GroupDecision(block * g.tie)
    policy = Policy(groups)
    pruned = prune_structure(model, graph, policy, X)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for n, g in graph.groups.items():
            gone = [i for i, b in enumerate(policy[n].bits) if b == 0]
            for layer in g.layers if gone else ():
                conv, bn = zeroed.get_submodule(layer), zeroed.get_submodule(graph.layers[layer].bn)
                conv.weight[gone] = 0
                bn.weight[gone], bn.bias[gone] = 0, 0
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)


def test_a_broadcast_gate_is_not_coupled_to_the_channels_it_scales():
    graph = analyse(SpatialGateNet().eval(), X)
    assert graph.layers["gate"].out_group == "gate" and graph.layers["stem.0"].out_group == "stem.0"
    assert not graph.groups["stem.0"].prunable and not graph.groups["gate"].prunable
    assert graph.layers["gate"].fixed_in == 2 and graph.groups["down.0"].prunable
    prune_structure(SpatialGateNet().eval(), graph, smallest_policy(graph), X)  # widths agree with the policy


def test_a_module_called_twice_folds_its_batchnorm_and_counts_both_calls():
    graph = analyse(ReusedNet().eval(), X)
    assert graph.layers["block.0"].bn == "block.1"
    assert not any(k.startswith("block.1.") for k in graph.extra_params)
    one_call = graph.layers["block.0"].params * 16 * 16
    assert graph.layers["block.0"].macs == 2 * one_call
    assert macs(graph, float_policy(graph)) == graph.macs
