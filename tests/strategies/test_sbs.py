"""SBS: the single-path quantizer, its gates, the cost term, the projection, and per-layer activation bits."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.budget import bops
from zerobit.export.runtime import save_zbit
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import analyse
from zerobit.importance import group_scores
from zerobit.policy import Policy, uniform_policy
from zerobit.quant.apply import apply_policy, kept_per_channel, quant_layers
from zerobit.quant.sbs import SBSAct, check_chain, combine, expected_bits, quantize_unit, residuals
from zerobit.strategies import SBS, Problem
from zerobit.strategies.sbs import GatedNet
from zerobit.strategies.sbs_project import project
from zerobit.train.calibrate import calibrate_activations
from zerobit.train.finetune import FinetuneConfig, finetune


def paper_residuals(z, chain):
    """The seed's definition: z₁ = D(z, s₁), ε₂ = D(z − z₁, s₂), ε₃ = D(z − z₁ − ε₂, s₃), …"""
    parts, acc = [], torch.zeros_like(z)
    for bits in chain:
        parts.append(quantize_unit(z - acc, bits))
        acc = acc + parts[-1]
    return parts


@pytest.mark.parametrize("chain", [(2, 4, 8), (3, 6), (2, 6), (1, 2, 4, 8)])
def test_single_path_equals_direct_quantization_at_every_width(chain):
    z = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    parts = residuals(z, chain)
    for ours, paper in zip(parts, paper_residuals(z, chain), strict=True):
        assert torch.allclose(ours, paper, atol=1e-6)
    for k, bits in enumerate(chain):
        gates = [torch.tensor(1.0)] * k + [torch.tensor(0.0)] * (len(chain) - 1 - k)
        got = combine(paper_residuals(z, chain), gates)
        want = torch.round(z * (2**bits - 1)) / (2**bits - 1)
        assert torch.allclose(got, want, atol=1e-6), bits
        assert len(torch.unique(torch.round(want * (2**bits - 1)))) == 2**bits  # every level of b bits is used
        assert expected_bits(chain, gates) == bits
        if k:
            assert not torch.allclose(got, quantize_unit(z, chain[k - 1]), atol=1e-3)  # wider is finer


def test_a_chain_that_does_not_nest_is_not_single_path():
    z = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    paper = combine(paper_residuals(z, (2, 3)), [torch.tensor(1.0)])
    assert not torch.allclose(paper, quantize_unit(z, 3), atol=1e-3)  # why check_chain refuses (2, 3)


def test_chains_that_do_not_nest_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        check_chain((2, 3), (2, 3, 4))
    with pytest.raises(ValueError, match="choose one or more"):
        check_chain((7,), (2, 4, 8))
    assert check_chain((8, 2, 4), (2, 4, 8)) == (2, 4, 8)


def test_activation_gates_and_range_receive_gradients():
    act = SBSAct((2, 4, 8), range_=2.0, signed=False, temperature=0.1, lr_scale=1.0)
    x = torch.rand(64, 8) * 3
    target = torch.randn(64, 8)
    loss = ((act(x) - target) ** 2).mean() + act.bits()
    loss.backward()
    assert act.thresholds.alpha.grad is not None and bool((act.thresholds.alpha.grad != 0).all())
    assert act.v.grad is not None and float(act.v.grad) != 0


def _problem(model, digits, budget, epochs=1.0, act_bits=8):
    graph = analyse(model, EXAMPLE)
    return Problem(model, graph, budget, EXAMPLE, digits.train, digits.val, group_scores(model, graph), act_bits,
                   FinetuneConfig(epochs=epochs, lr=0.02), progress=False)


def test_weight_and_pruning_gates_receive_gradients(trained_residual, digits):
    net = GatedNet(_problem(trained_residual, digits, zb.BOPs(fraction=1 / 32)), SBS())
    net.model.train()
    x, y = digits.train.x[:64], digits.train.y[:64]
    loss = torch.nn.functional.cross_entropy(net.model(x), y) + torch.log(net.cost())
    loss.backward()
    for gates in (net.bit_gates, net.prune_gates):
        grads = [m.alpha.grad for m in gates.values()]
        assert grads and all(g is not None for g in grads)
        assert any(bool((g != 0).any()) for g in grads)
    assert any(q.v.grad is not None and bool((q.v.grad != 0).any()) for q in net.layers.values())


@pytest.mark.parametrize("kind", [zb.BOPs, zb.Size])
def test_cost_weight_moves_the_cost_to_the_target(trained_residual, digits, kind):
    """Every gate starts open (the cost far above both limits); the cost term brings the gates' cost to each
    limit, from above and back up from below."""
    fractions = (1 / 40, 1 / 120) if kind is zb.BOPs else (1 / 7, 1 / 12)
    ratios = []
    for fraction in fractions:
        problem = _problem(trained_residual, digits, kind(fraction=fraction))
        net = GatedNet(problem, SBS(cost_weight=2.0, gate_lr=10.0, min_keep=0.25))
        assert problem.cost(net.policy()) > 1.5 * problem.limit

        def penalty(net=net, problem=problem):
            net.steps += 1
            return 2.0 * torch.log(net.cost() / problem.limit).abs()

        finetune(net.model, digits.train, problem.finetune, progress=False, steps=120, penalty=penalty)
        with torch.no_grad():
            net.model(digits.train.x[:64])
        ratios.append(problem.cost(net.policy()) / problem.limit)
    assert all(0.6 < r < 1.35 for r in ratios), ratios


@pytest.mark.parametrize("budget", [zb.BOPs(fraction=1 / 100), zb.Size(fraction=1 / 10), zb.MACs(fraction=1 / 3)])
def test_projection_always_fits_and_uses_the_budget(trained_residual, digits, budget):
    problem = _problem(trained_residual, digits, budget)
    net = GatedNet(problem, SBS())
    with torch.no_grad():
        net.model(digits.train.x[:64])
    margins = net.margins()
    gen = torch.Generator().manual_seed(1)
    margins.weight = {g: torch.randn(len(v), generator=gen).tolist() for g, v in margins.weight.items()}
    margins.channel = {g: torch.randn(len(v), generator=gen) for g, v in margins.channel.items()}
    margins.act = {n: torch.randn(len(v), generator=gen).tolist() for n, v in margins.act.items()}
    found = net.policy()
    assert problem.cost(found) > problem.limit  # every width open: far over
    policy = project(problem, found, margins)
    policy.validate(problem.graph)
    assert problem.fits(policy)
    assert problem.cost(policy) > 0.7 * problem.limit  # filled back up after closing too much


def test_a_chain_of_widths_that_do_not_nest_is_refused(trained_residual, digits):
    with pytest.raises(ValueError, match="does not divide"):
        SBS(bits=(2, 3)).search(_problem(trained_residual, digits, zb.BOPs(fraction=1 / 8)))


def test_a_final_learning_rate_of_zero_is_refused(trained_residual, digits):
    with pytest.raises(ValueError, match="final_lr > 0"):
        SBS(final_lr=0).search(_problem(trained_residual, digits, zb.BOPs(fraction=1 / 8)))


def test_per_layer_activation_bits_count_in_bops():
    model = TINY_MODELS["plain"]().eval()
    graph = analyse(model, EXAMPLE)
    base = uniform_policy(graph, group_scores(model, graph), keep=0.75, bits=4)
    layers = list(graph.layers)
    policy = Policy(base.groups, 8, act={layers[0]: 2, layers[-1]: 32})
    want = 0
    for name, layer in graph.layers.items():
        abits = {layers[0]: 2, layers[-1]: 32}.get(name, 8)
        want += sum(policy[layer.out_group].kept_bits()) * kept_per_channel(graph, policy, name) * \
            layer.out_area * abits
    assert bops(graph, policy) == want != bops(graph, base)


def test_per_layer_activation_bits_round_trip(tmp_path, trained_residual, digits):
    graph = analyse(trained_residual, EXAMPLE)
    base = uniform_policy(graph, group_scores(trained_residual, graph), keep=0.75, bits=4)
    layers = list(graph.layers)
    policy = Policy(base.groups, 8, act={layers[0]: 4, layers[1]: 2, layers[2]: 32})
    assert Policy.from_dict(policy.to_dict()) == policy and policy.to_dict()["version"] == 2
    v1 = base.to_dict() | {"version": 1}
    assert Policy.from_dict(v1) == base
    qmodel = apply_policy(trained_residual, graph, policy, EXAMPLE)
    calibrate_activations(qmodel, [digits.train.x[:256]])
    assert [q.act.bits for q in quant_layers(qmodel).values()][:3] == [4, 2, 32]
    path = tmp_path / "act.zbit"
    written = save_zbit(qmodel, graph, policy, path)
    assert written == os.path.getsize(path) == estimate_bytes(graph, policy)
    loaded = zb.load(path, TINY_MODELS["residual"]())
    x = digits.test.x[:128]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel.eval()(x))
    stored = zb.read_zbit(path)
    assert stored.full_policy(graph) == policy


def test_sbs_compress_end_to_end(tmp_path, trained_residual, digits):
    budget = zb.BOPs(fraction=1 / 48)
    result = zb.compress(trained_residual, EXAMPLE, budget, SBS(gate_lr=20.0), train_data=digits.train,
                         eval_data=digits.val, test_data=digits.test, progress=False,
                         finetune_config=zb.FinetuneConfig(epochs=6, lr=0.02))
    assert bops(result.graph, result.policy) <= budget.limit(result.graph)
    history = result.info["sbs_history"]
    assert history and {"loss", "cost", "weight_bits", "act_bits", "kept"} <= set(history[-1])
    assert len({result.policy.act_of(n) for n in result.graph.layers}) >= 1
    path = tmp_path / "sbs.zbit"
    assert zb.save(result, path) == os.path.getsize(path) == result.file_bytes
    loaded = zb.load(path, TINY_MODELS["residual"]())
    with torch.no_grad():
        assert torch.equal(loaded(digits.test.x), result.model.eval()(digits.test.x))
    assert result.accuracy > 0.5  # 48× fewer bit-operations than fp32, 6 short epochs on 1,200 images


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("open_gates", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_fast_activation_path_matches_the_autograd_one(signed, open_gates):
    """SBSAct's fused forward/backward gives the values and gradients of the plain single-path formula."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 2
    act = SBSAct((2, 4, 8), range_=3.0, signed=signed, temperature=0.1, lr_scale=1.0)
    act.thresholds.started.fill_(True)
    with torch.no_grad():  # a gate is open when its statistic (≈ 0.25 of a step, ≥ 0.05 here) beats its threshold
        act.thresholds.alpha.copy_(torch.tensor([-1.0 if g else 5.0 for g in open_gates]))
    grad = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    out = act(xa)
    (out * grad).sum().backward()
    fast = (out.detach(), xa.grad, act.v.grad.clone(), act.thresholds.alpha.grad.clone())
    act.zero_grad()
    xb = x.clone().requires_grad_(True)
    v = act.v
    z = (torch.clamp(xb / v, -1, 1) + 1) / 2 if signed else torch.clamp(xb / v, 0, 1)
    parts = paper_residuals(z, (2, 4, 8))
    zq = combine(parts, act.thresholds.gates(act.stats, 0.1))
    ref = v * (2 * zq - 1) if signed else v * zq
    (ref * grad).sum().backward()
    assert torch.allclose(fast[0], ref.detach(), atol=1e-5)
    assert torch.allclose(fast[1], xb.grad, atol=1e-5)
    assert torch.allclose(fast[2], act.v.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fast[3], act.thresholds.alpha.grad, rtol=1e-4, atol=1e-5)


def test_command_line_options_give_chains():
    from zerobit.cli import parse_options
    from zerobit.strategies import get_strategy

    strat = get_strategy("sbs", **parse_options(["bits=3,6", "act_bits=8", "min_keep=0.5"]))
    assert (strat.bits, strat.act_bits, strat.min_keep) == ((3, 6), (8,), 0.5)


def test_a_killed_gate_training_resumes_from_its_checkpoint(tmp_path, trained_residual, digits, monkeypatch):
    """The search dies right after its 2nd of 4 epochs is saved; started again with the file it goes on from there
    and ends where an uninterrupted search ends (same step count, history and policy)."""
    from zerobit.train.loop import Checkpoint

    problem = _problem(trained_residual, digits, zb.BOPs(fraction=1 / 48), epochs=8.0)
    fresh = SBS(gate_lr=20.0).search(problem)
    path, saves, save = tmp_path / "sbs.ckpt", [], Checkpoint.save

    def save_then_die_after_two(self, *args):
        save(self, *args)
        saves.append(args[-2])  # the step
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save_then_die_after_two)
    with pytest.raises(KeyboardInterrupt):
        SBS(gate_lr=20.0, checkpoint=str(path)).search(problem)
    monkeypatch.setattr(Checkpoint, "save", save)
    resumed = SBS(gate_lr=20.0, checkpoint=str(path)).search(problem)
    assert 0 < saves[1] < resumed.info["sbs_steps"] == fresh.info["sbs_steps"]
    assert resumed.info["sbs_history"] == fresh.info["sbs_history"]
    assert resumed.policy == fresh.policy
    with pytest.raises(ValueError, match="belongs to another run"):
        SBS(gate_lr=10.0, checkpoint=str(path)).search(problem)
