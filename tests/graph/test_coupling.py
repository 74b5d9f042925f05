"""Couplings zerobit keeps exact by not pruning them: grouped convs, broadcast gates; folding reused layers."""

from __future__ import annotations

import torch
from models_elsewhere import GroupedNet, ReusedNet, SpatialGateNet

from zerobit.budget import float_policy, macs, smallest_policy
from zerobit.graph import analyse
from zerobit.quant.apply import prune_structure

X = torch.zeros(1, 1, 16, 16)


def test_grouped_convs_are_quantized_and_their_neighbours_keep_their_channels():
    graph = analyse(GroupedNet().eval(), X)
    prunable = {n: g.prunable for n, g in graph.groups.items()}
    # stem feeds g2 (groups=2), g2's output is grouped, wide feeds g4, g4's output is grouped
    assert prunable == {"stem.0": False, "g2.0": False, "mid.0": True, "wide.0": False, "g4.0": False, "fc": False}
    assert graph.layers["g4.0"].weights_per_channel == 32 // 4 * 9
    pruned = prune_structure(GroupedNet().eval(), graph, smallest_policy(graph), X)
    assert pruned.mid[0].out_channels == 1 and pruned.wide[0].in_channels == 1
    assert pruned.g4[0].weight.shape == (64, 8, 3, 3)


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
