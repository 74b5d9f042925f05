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
