from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import EXAMPLE, TINY_MODELS
from torch import nn

from zerobit.budget import float_policy, macs
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


def test_statistics_by_hand(tmp_path):
    model = TINY_MODELS["plain"]()
    g = analyse(model, EXAMPLE)
    c1, c2, fc = g.layers["features.0.0"], g.layers["features.1.0"], g.layers["fc"]
    assert (c1.params, c1.macs) == (12 * 9, 12 * 9 * 64)
    assert (c2.params, c2.macs) == (16 * 12 * 9, 16 * 12 * 9 * 16)
    assert (fc.params, fc.macs) == (160, 160)
    assert c1.bn == "features.0.1" and fc.bn is None
    assert g.macs == c1.macs + c2.macs + fc.macs
    # fp32_bytes is the size of the float32 safetensors file on disk, byte for byte
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "fp32.safetensors")
    raw = (tmp_path / "fp32.safetensors").read_bytes()
    assert g.fp32_bytes == len(raw)
    header = struct.unpack("<Q", raw[:8])[0]
    assert set(json.loads(raw[8:8 + header])) - {"__metadata__"} == set(state)
    assert g.fp32_bytes == 8 + header + sum(v.numel() * v.element_size() for v in state.values())
    rows = g.summary().splitlines()[1:]
    assert [r.split()[:3] for r in rows] == [[n, str(grp.channels), str(grp.prunable)] for n, grp in g.groups.items()]


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


class Tokens(nn.Module):
    """Linears on a (B, T, C) sequence: each runs once per token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mix = nn.Linear(16, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.relu(self.embed(x)))).mean(1))


class ChannelsLast(nn.Module):
    """A conv, then Linears on its (B, H, W, C) permutation: each runs once per pixel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(torch.relu(self.fc1(x.permute(0, 2, 3, 1))))
        return self.head((x + y.permute(0, 3, 1, 2)).mean(dim=(2, 3)))


class Reused(nn.Module):
    """One conv module called twice, at 8×8 and then at 4×4."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.block = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        x = torch.relu(self.block(self.pool(x)))
        return self.head(x.mean(dim=(2, 3)))


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample measured on a real forward pass, every call of every Conv2d/Linear counted."""
    total = 0

    def hook(m, _inputs, out):
        nonlocal total
        per_sample = out.numel() // out.shape[0]
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += per_sample * (m.in_channels // m.groups) * kh * kw
        else:
            total += per_sample * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("make,shape", [(Tokens, (2, 5, 8)), (ChannelsLast, (2, 1, 8, 8)), (Reused, (2, 1, 8, 8)),
                                        (TINY_MODELS["layernorm"], (2, 1, 8, 8))])
def test_macs_match_a_forward_pass(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)  # batch of 2: the count is per sample
    g = analyse(model, x)
    expected = hooked_macs(model, x)
    assert macs(g, float_policy(g)) == g.macs == expected


class FixedWidthHead(nn.Module):
    """Model code that hard-codes a width: the second conv's output is viewed as (B, 16, H·W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.view(x.shape[0], 16, -1).mean(-1))


def test_a_group_the_model_code_cannot_shrink_keeps_its_channels(tmp_path):
    import zerobit as zb
    from zerobit.data.loaders import TensorData

    model = FixedWidthHead().eval()
    graph = analyse(model, EXAMPLE)
    assert graph.groups["conv1"].prunable and not graph.groups["conv2"].prunable
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(64, *EXAMPLE.shape[1:], generator=g), torch.randint(0, 10, (64,), generator=g))
    r = zb.compress(model, EXAMPLE, zb.Size(fraction=1 / 8), "uniform", train_data=data, eval_data=data,
                    finetune_config=zb.FinetuneConfig(epochs=0), progress=False)  # it failed at the end before
    assert r.policy["conv2"].kept == 16 and r.policy["conv1"].kept < 8
    r.save(tmp_path / "m.zbit")
    assert zb.load(tmp_path / "m.zbit", FixedWidthHead(), example_inputs=EXAMPLE)(EXAMPLE).shape == (1, 10)
