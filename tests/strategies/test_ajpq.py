"""AJPQ on a tiny residual model and digits: the agent learns, the wall holds, a killed search resumes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import EXAMPLE

from zerobit.budget import BOPs, Size
from zerobit.graph import analyse
from zerobit.importance import group_scores
from zerobit.policy import uniform_policy
from zerobit.strategies import AJPQ, ActionSpace, Problem, ProxyConfig
from zerobit.strategies.ajpq import _keep_top, group_decision
from zerobit.strategies.proxy import proxy_reference, proxy_reward, proxy_scores

PROXY = ProxyConfig(recovery_batches=4, samples=300)


def problem_for(model, digits, budget):
    graph = analyse(model, EXAMPLE)
    return Problem(model, graph, budget, EXAMPLE, digits.train, digits.val, group_scores(model, graph),
                   progress=False)


def scored_policies(monkeypatch) -> list:
    """Every policy the search hands to its proxy (each episode's, then the re-ranked leaders), in order."""
    import zerobit.strategies.ajpq as ajpq_module

    seen, score = [], ajpq_module.proxy_scores

    def recording(problem, reference, policy, *args, **kwargs):
        seen.append(policy)
        return score(problem, reference, policy, *args, **kwargs)

    monkeypatch.setattr(ajpq_module, "proxy_scores", recording)
    return seen


def test_channel_controller_gives_important_channels_more_bits():
    scores = torch.arange(24, dtype=torch.float)  # channel 23 most important
    d = group_decision(scores, sparsity=0.25, level=2, space=ActionSpace(chunk=4), prunable=True)
    assert d.bits[:6] == (0,) * 6  # lowest-ranked quarter removed
    assert d.bits[23] == 5 and d.bits[6] == 3 and d.bits[14] == 4  # +1 / −1 level around level 2 (4 bits)
    prune_only = group_decision(scores, 0.5, 0, ActionSpace(quantize=False, fixed_bits=6), True)
    assert set(prune_only.kept_bits()) == {6} and prune_only.kept == 12
    quant_only = group_decision(scores, 0.5, 3, ActionSpace(prune=False), True)
    assert quant_only.kept == 24


def test_proxy_scores_grow_worse_with_damage(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    cfg = ProxyConfig(recovery_batches=4, samples=300)
    ref = proxy_reference(prob, cfg)
    gentle = proxy_scores(prob, ref, uniform_policy(prob.graph, prob.scores, keep=1.0, bits=8), cfg)
    harsh = proxy_scores(prob, ref, uniform_policy(prob.graph, prob.scores, keep=0.3, bits=2), cfg)
    assert abs(gentle["accuracy"] - ref.accuracy) <= 2 and gentle["kl"] < 0.05
    assert harsh["accuracy"] < gentle["accuracy"] - 10 and harsh["kl"] > 10 * gentle["kl"]
    for metric in ("accuracy", "kl"):
        assert proxy_reward(gentle, ref, metric) > proxy_reward(harsh, ref, metric)


def test_bfloat16_proxy_agrees_with_float32(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    policies = [uniform_policy(prob.graph, prob.scores, keep=k, bits=b) for k, b in ((1.0, 8), (0.6, 4), (0.3, 2))]
    accs, kls = {}, {}
    for precision in ("float32", "bfloat16"):
        cfg = ProxyConfig(recovery_batches=4, samples=300, precision=precision)
        ref = proxy_reference(prob, cfg)
        scores = [proxy_scores(prob, ref, p, cfg) for p in policies]
        accs[precision], kls[precision] = [s["accuracy"] for s in scores], [s["kl"] for s in scores]
    assert kls["float32"] != kls["bfloat16"]  # the autocast really ran
    assert np.allclose(accs["float32"], accs["bfloat16"], atol=2.0)  # 300 images: 2 points = 6 images
    assert np.argsort(accs["float32"]).tolist() == np.argsort(accs["bfloat16"]).tolist()
    with pytest.raises(ValueError, match="precision"):
        ProxyConfig(precision="float16")


def test_agent_beats_random_policies_and_the_wall_always_holds(trained_residual, digits, monkeypatch):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    scored = scored_policies(monkeypatch)
    result = AJPQ(episodes=60, warmup=15, proxy=PROXY, seed=0).search(prob)
    rewards = np.array(result.info["rewards"])
    assert rewards[-15:].mean() > rewards[:15].mean() + 1.0  # learned episodes beat the random warm-up
    assert result.info["best_reward"] == rewards.max()
    # the wall holds for every episode, not only for the answer, and the agent does run into it
    assert len(scored) == 60 + len(result.info["rerank"]) and result.policy in scored
    costs = [prob.cost(p) for p in scored]
    assert max(costs) <= prob.limit and max(costs) > 0.9 * prob.limit


def test_top_list_keeps_the_best_distinct_policies():
    top: list = []
    for reward, policy in [(1.0, {"p": 1}), (3.0, {"p": 2}), (2.0, {"p": 3}), (4.0, {"p": 1}), (0.5, {"p": 4})]:
        _keep_top(top, reward, policy, k=3)
    assert top == [[4.0, {"p": 1}], [3.0, {"p": 2}], [2.0, {"p": 3}]]  # a repeat keeps one entry, its best


def test_final_rerank_returns_the_leader_of_the_larger_evaluation(trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    final = ProxyConfig(recovery_batches=6, samples=360)
    result = AJPQ(episodes=10, warmup=10, proxy=ProxyConfig(recovery_batches=1, samples=40), rerank=4,
                  final=final).search(prob)
    rerank = result.info["rerank"]
    assert len(rerank) == 4 and [r["search_reward"] for r in rerank] == sorted(
        [r["search_reward"] for r in rerank], reverse=True)
    ref = proxy_reference(prob, final)
    again = proxy_reward(proxy_scores(prob, ref, result.policy, final), ref, final.metric)
    assert again == max(r["final_reward"] for r in rerank)  # the returned policy is the re-scored leader
    assert prob.fits(result.policy)
    single = AJPQ(episodes=10, warmup=10, proxy=ProxyConfig(recovery_batches=1, samples=40), rerank=1).search(prob)
    assert single.info["rerank"] == [] and single.info["best_reward"] == max(single.info["rewards"])



def test_the_agent_searches_widths_of_the_problems_channel_multiple(trained_plain, digits, monkeypatch):
    """With channel_multiple=4 every policy the agent scores keeps multiples of 4 channels (its rewards are those
    of the widths deployed, nothing is rounded after the search), and fits."""
    import dataclasses

    prob = dataclasses.replace(problem_for(trained_plain, digits, Size(fraction=1 / 6)), channel_multiple=4)
    scored = scored_policies(monkeypatch)
    AJPQ(episodes=8, warmup=8, proxy=ProxyConfig(recovery_batches=1, samples=40), rerank=1).search(prob)
    kept = [[d.kept for n, d in p.groups.items() if prob.graph.groups[n].prunable] for p in scored]
    assert len(scored) >= 8 and all(k % 4 == 0 for ks in kept for k in ks), kept
    assert len({tuple(k) for k in kept}) > 1 and all(prob.fits(p) for p in scored)  # the agent explored

@pytest.mark.parametrize("space", [ActionSpace(prune=False), ActionSpace(quantize=False, fixed_bits=4)])
def test_special_cases_respect_their_space_and_bops_wall(trained_residual, digits, space, monkeypatch):
    prob = problem_for(trained_residual, digits, BOPs(fraction=1 / 40))
    scored = scored_policies(monkeypatch)
    result = AJPQ(episodes=12, warmup=6, space=space, proxy=PROXY).search(prob)
    assert len(scored) >= 12 and result.policy in scored
    for policy in scored:  # every episode's policy, not only the answer
        assert prob.fits(policy)
        decisions = policy.groups.values()
        if space.prune:  # pruning only: every kept channel at the fixed 4 bits
            assert {b for d in decisions for b in d.kept_bits()} == {4}
        else:  # quantization only: no channel removed
            assert all(d.kept == d.channels for d in decisions)
    if space.prune:
        assert any(d.kept < d.channels for p in scored for d in p.groups.values())  # it does prune
    else:
        assert len({b for p in scored for d in p.groups.values() for b in d.kept_bits()}) > 1  # it does choose bits


def test_killed_search_resumes_where_it_stopped(tmp_path, trained_residual, digits):
    state = tmp_path / "search.state"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        torch.set_num_threads(1)
        from conftest import train_tiny
        from zerobit.data import get_splits
        from zerobit.strategies import AJPQ, ProxyConfig
        from strategies.test_ajpq import problem_for
        from zerobit.budget import Size
        d = get_splits("digits")
        prob = problem_for(train_tiny("residual", d), d, Size(fraction=1 / 5))
        AJPQ(episodes=int(sys.argv[1]), warmup=5, proxy=ProxyConfig(recovery_batches=4, samples=300), checkpoint={str(state)!r}).search(prob)
    """)
    total = 24
    proc = subprocess.Popen([sys.executable, "-c", script, str(total)])
    import json

    from safetensors import safe_open

    def episodes_done() -> int:
        try:
            with safe_open(str(state), "pt") as f:
                return json.loads(f.metadata()["state"])["episode"]
        except Exception:
            return 0

    deadline = time.time() + 240
    while episodes_done() < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    stopped_at = episodes_done()
    assert 8 <= stopped_at < total
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    resumed = AJPQ(episodes=total, warmup=5, proxy=PROXY, checkpoint=str(state)).search(prob)
    fresh = AJPQ(episodes=total, warmup=5, proxy=PROXY).search(prob)
    assert resumed.info["episodes"] == total
    assert resumed.info["rewards"] == fresh.info["rewards"]  # same seed: the interruption changed nothing
    assert resumed.policy == fresh.policy


def test_checkpoint_of_other_settings_or_budget_is_refused(tmp_path, trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    AJPQ(episodes=2, warmup=2, proxy=PROXY, checkpoint=str(tmp_path / "s")).search(prob)
    with pytest.raises(ValueError, match="other settings"):
        AJPQ(episodes=2, warmup=2, proxy=PROXY, seed=5, checkpoint=str(tmp_path / "s")).search(prob)
    other_budget = problem_for(trained_residual, digits, Size(fraction=1 / 6))
    with pytest.raises(ValueError, match="another model or budget"):
        AJPQ(episodes=2, warmup=2, proxy=PROXY, checkpoint=str(tmp_path / "s")).search(other_budget)
    assert AJPQ(episodes=3, warmup=2, proxy=PROXY, checkpoint=str(tmp_path / "s")).search(prob).info["episodes"] == 3
