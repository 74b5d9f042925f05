from __future__ import annotations

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

from zerobit.graph import analyse
from zerobit.policy import GroupDecision, Policy, uniform_policy


def test_json_roundtrip(tmp_path):
    p = Policy({"a": GroupDecision((8, 0, 32, 2)), "b": GroupDecision((3, 3))}, act_bits=8)
    p.save(str(tmp_path / "p.json"))
    assert Policy.load(str(tmp_path / "p.json")) == p
    assert p.to_dict()["groups"]["a"] == "80f2"


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="not supported"):
        GroupDecision((7,))
    with pytest.raises(ValueError, match="activation bits"):
        Policy({}, act_bits=7)
    with pytest.raises(ValueError, match="activation bits"):
        Policy({}, act_bits=8, act={"conv": 1})
    with pytest.raises(ValueError, match="version"):
        Policy.from_dict({"version": 99, "groups": {}, "act_bits": 8})


def test_validate_against_graph():
    g = analyse(TINY_MODELS["residual"](), EXAMPLE)
    scores = {n: torch.arange(c.channels, dtype=torch.float) for n, c in g.groups.items()}
    p = uniform_policy(g, scores, keep=0.5, bits=4)
    p.validate(g)
    assert p["stem.0"].bits == (0, 0, 0, 0, 4, 4, 4, 4)  # lowest scores removed
    assert p["fc"].kept == 10  # the output layer never loses channels
    with pytest.raises(ValueError, match="every channel is removed"):
        Policy(dict(p.groups) | {"stem.0": GroupDecision((0,) * 8)}).validate(g)
    with pytest.raises(ValueError, match="cannot lose channels"):
        Policy(dict(p.groups) | {"fc": GroupDecision((0,) + (4,) * 9)}).validate(g)
    with pytest.raises(ValueError, match="channels"):
        Policy(dict(p.groups) | {"stem.0": GroupDecision((4,) * 3)}).validate(g)
    with pytest.raises(ValueError, match="missing groups"):
        Policy({"stem.0": p["stem.0"]}).validate(g)


def test_table_lists_every_group():
    g = analyse(TINY_MODELS["plain"](), EXAMPLE)
    p = uniform_policy(g, {n: torch.ones(c.channels) for n, c in g.groups.items()}, keep=0.5, bits=4)
    text = str(p)
    assert all(name in text for name in g.groups) and "6/12" in text and "4b×6" in text


def test_aligned_policies_keep_multiples_and_drop_the_least_important():
    from zerobit.policy import align_policy, aligned_count

    assert [aligned_count(k, 16, 8) for k in (1, 7, 8, 9, 15, 16)] == [8, 8, 8, 8, 8, 16]
    assert [aligned_count(k, 6, 8) for k in (1, 5, 6)] == [6, 6, 6]  # a group smaller than the multiple: whole
    assert aligned_count(7, 16, 1) == 7
    for name, build in TINY_MODELS.items():
        g = analyse(build(), EXAMPLE)
        scores = {n: torch.randn(c.channels, generator=torch.Generator().manual_seed(1)) for n, c in g.groups.items()}
        for keep in (0.2, 0.45, 0.7):
            p = uniform_policy(g, scores, keep, 4)
            a = align_policy(g, p, scores, 4)
            a.validate(g)
            for n, group in g.groups.items():
                kept = a[n].kept // group.tie
                assert kept == aligned_count(p[n].kept // group.tie, group.block, 4), (name, n)
                assert kept % 4 == 0 or kept == group.block or not group.prunable, (name, n, kept)
                removed = [i for i, (x, y) in enumerate(zip(p[n].bits, a[n].bits, strict=True)) if x > 0 and y == 0]
                if removed:  # the channels dropped score lowest among those the policy kept
                    survivors = [scores[n][i] for i, b in enumerate(a[n].bits) if b > 0]
                    assert max(scores[n][i] for i in removed) <= min(survivors)
            assert uniform_policy(g, scores, keep, 4, multiple=4) == align_policy(g, p, scores, 4)
    # a count rounded up gets the best-scoring removed channels back, at the group's lowest kept width
    g = analyse(TINY_MODELS["plain"](), EXAMPLE)
    scores = {n: torch.arange(c.channels, dtype=torch.float) for n, c in g.groups.items()}
    p = Policy(dict(uniform_policy(g, scores, 1.0, 4).groups) | {"features.0.0": GroupDecision((6, 3) + (0,) * 10)})
    up = align_policy(g, p, scores, 4)
    assert up["features.0.0"].bits == (6, 3) + (0,) * 8 + (3, 3)
    assert align_policy(g, up, scores, 4) is up


def test_fill_aligned_spends_the_slack_on_the_groups_that_lost_most():
    from zerobit.policy import align_policy, fill_aligned

    g = analyse(TINY_MODELS["plain"](), EXAMPLE)  # groups of 12 and 16 channels, and the output layer
    scores = {n: torch.arange(c.channels, dtype=torch.float) for n, c in g.groups.items()}
    p = uniform_policy(g, scores, 0.7, 4)  # 8/12 and 11/16 kept
    down = align_policy(g, p, scores, 4)
    assert (down["features.0.0"].kept, down["features.1.0"].kept) == (8, 8)
    targets = {n: p[n].kept for n in g.groups}
    total = lambda q: q["features.0.0"].kept + q["features.1.0"].kept  # noqa: E731
    # room for one step of 4: it goes to the 16-channel group, which lost 3/16 (the other lost 0/12)
    one = fill_aligned(g, down, scores, 4, targets, lambda q: total(q) <= 20)
    assert (one["features.0.0"].kept, one["features.1.0"].kept) == (8, 12)
    assert one["features.1.0"].bits[4:] == (4,) * 12  # the best-scoring channels came back, at 4 bits
    assert fill_aligned(g, down, scores, 4, targets, lambda q: total(q) <= 19) == down  # no room: unchanged
    # a group never grows past its target's share: the 12-channel group keeps 8
    assert fill_aligned(g, down, scores, 4, targets, lambda q: True)["features.0.0"].kept == 8
