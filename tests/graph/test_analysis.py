from __future__ import annotations

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS
from torch import nn

from zerobit.graph import UntraceableModelError, analyse


def test_residual_adds_couple_all_contributors():
    g = analyse(TINY_MODELS["residual"](), EXAMPLE)
    assert sorted(g.groups["stem.0"].layers) == ["a1.1", "a2.1", "stem.0"]
    assert g.layers["a1.1"].out_group == "stem.0"
    assert g.layers["fc"].in_sources == [("stem.0", 1)]
    assert not g.groups["fc"].prunable and g.groups["stem.0"].prunable


def test_depthwise_shares_group_with_its_producer():
    g = analyse(TINY_MODELS["depthwise"](), EXAMPLE)
    assert g.layers["dw.0"].kind == "depthwise"
    assert g.layers["dw.0"].out_group == "expand.0"
    assert sorted(g.groups["expand.0"].layers) == ["dw.0", "expand.0"]
    assert g.layers["project.0"].in_sources == [("expand.0", 1)]


def test_concat_and_flatten_inputs():
    g = analyse(TINY_MODELS["concat"](), EXAMPLE)
    assert sorted(g.layers["merge.0"].in_sources) == [("left.0", 1), ("right.0", 1)]
    assert g.layers["fc"].in_sources == [("merge.0", 16)]  # 4×4 spatial positions per channel
    assert g.layers["left.0"].fixed_in == 1  # the image channel


def test_statistics_by_hand():
    g = analyse(TINY_MODELS["plain"](), EXAMPLE)
    c1, c2, fc = g.layers["features.0.0"], g.layers["features.1.0"], g.layers["fc"]
    assert (c1.params, c1.macs) == (12 * 9, 12 * 9 * 64)
    assert (c2.params, c2.macs) == (16 * 12 * 9, 16 * 12 * 9 * 16)
    assert (fc.params, fc.macs) == (160, 160)
    assert c1.bn == "features.0.1" and fc.bn is None
    assert g.macs == c1.macs + c2.macs + fc.macs
    state = TINY_MODELS["plain"]().state_dict()
    assert g.fp32_bytes > 4 * sum(v.numel() for v in state.values())
    assert "group" in g.summary()


def test_untraceable_model_is_refused_clearly():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x).tolist()  # not a tensor program

    with pytest.raises(UntraceableModelError, match="could not trace"):
        analyse(Branchy(), EXAMPLE)


def test_unknown_ignored_layer():
    with pytest.raises(ValueError, match="not modules"):
        analyse(TINY_MODELS["plain"](), EXAMPLE, ignored_layers=["nope"])


def test_model_left_unchanged():
    model = TINY_MODELS["residual"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyse(model, torch.randn(2, 1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
