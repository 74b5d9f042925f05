"""Ray for real: a local 2-CPU Ray instance scores AJPQ's policies on actors exactly as this process does."""

from __future__ import annotations

import numpy as np
import pytest
from strategies.test_ajpq import PROXY, problem_for

from zerobit.budget import Size
from zerobit.parallel import ScorePool
from zerobit.policy import uniform_policy
from zerobit.strategies import AJPQ
from zerobit.strategies.ajpq import score_policy
from zerobit.strategies.proxy import proxy_reference

pytestmark = pytest.mark.slow


def _square(context: int, item: int) -> int:
    return context * item * item


def test_one_worker_runs_here_in_order():
    pool = ScorePool(_square, 3, workers=1)
    assert pool.actors == [] and pool.map([1, 2, 3]) == [3, 12, 27]
    with pytest.raises(ValueError, match="workers"):
        ScorePool(_square, 3, workers=0)


def test_actors_score_policies_exactly_as_here(ray_local, trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    reference = proxy_reference(prob, PROXY, 0)
    items = [(uniform_policy(prob.graph, prob.scores, keep, bits).to_dict(), seed)
             for bits, keep, seed in ((8, 1.0, 0), (4, 0.6, 1), (2, 0.5, 2))]
    context = (prob, reference, PROXY)
    here = [score_policy(context, item) for item in items]
    with ScorePool(score_policy, context, workers=2) as pool:
        assert len(pool.actors) == 2
        there = pool.map(items)
        pool.set_context((prob, reference, PROXY))
        again = pool.map(items[::-1])
    assert there == here and again == here[::-1]  # the same numbers, in the order asked
    assert here[0] > here[2]  # and they are real scores: 2 bits at half the channels scores lower


def test_ajpq_batched_rollouts_on_ray_actors(ray_local, trained_residual, digits):
    prob = problem_for(trained_residual, digits, Size(fraction=1 / 5))
    serial = AJPQ(episodes=12, warmup=4, proxy=PROXY, rerank=3).search(prob)
    assert AJPQ(episodes=12, warmup=4, proxy=PROXY, rerank=3, workers=1).search(prob).info == serial.info
    found = AJPQ(episodes=12, warmup=4, proxy=PROXY, rerank=3, workers=2).search(prob)
    rewards = np.array(found.info["rewards"])
    assert len(rewards) == 12 and prob.fits(found.policy)
    # the warm-up is uniform random either way: the first batch of K = 2 episodes is the serial run's
    assert rewards[:2].tolist() == serial.info["rewards"][:2]
    assert len(found.info["rerank"]) == 3 and all(r["cost"] <= prob.limit for r in found.info["rerank"])
