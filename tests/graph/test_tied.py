"""Tied weights (zerobit.graph.tied): two layers using one weight tensor are one channel group, quantized once,
stored once, and load back holding one Parameter."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import EXAMPLE
from torch import nn

import zerobit as zb
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import analyse


class TiedMLP(nn.Module):
    """`b` applies `a`'s weight (with a bias of its own) to `a`'s output: the same (16, 16) tensor, read from
    inputs of different groups."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(torch.relu(self.inp(x.flatten(1)))))
        return self.out(torch.relu(self.b(h)))


def test_the_later_layer_shares_the_earlier_ones_group_and_its_inputs_keep_their_channels() -> None:
    g = analyse(TiedMLP(), EXAMPLE)
    assert g.layers["b"].shares == "a" and g.layers["a"].shares is None
    assert g.groups["a"].layers == ["a", "b"] and "b" not in g.groups and not g.groups["a"].prunable
    assert not g.groups["inp"].prunable  # a column of the shared weight would go for `a` only
    assert g.weight_layers == ["inp", "a", "out"]
    untied = analyse(TiedMLP(), EXAMPLE, tied=False)
    assert untied.layers["b"].shares is None and untied.groups["inp"].prunable
    policy = zb.Policy({n: zb.GroupDecision((4,) * c.channels) for n, c in g.groups.items()}, 8)
    twice = zb.Policy({**policy.groups, "b": policy["a"]}, 8)
    saved = estimate_bytes(untied, twice) - estimate_bytes(g, policy)
    assert 16 * 16 * 4 // 8 + 16 * 2 <= saved < 16 * 16 * 4 // 8 + 16 * 2 + 64  # codes and scales (and header)


@pytest.mark.parametrize("strategy", ["uniform", "opq", "admm"])
def test_a_tied_model_compresses_and_loads_with_one_weight(digits, strategy: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = TiedMLP().eval()
    options = {"admm": {"iterations": 2}}.get(strategy, {})
    r = zb.compress(model, EXAMPLE, zb.Size(fraction=1 / 4), zb.STRATEGIES[strategy](**options),
                    train_data=digits.train, eval_data=digits.val, finetune_config=zb.FinetuneConfig(epochs=0.2),
                    progress=False)
    assert r.model.b.layer.weight is r.model.a.layer.weight
    assert model.b.weight is model.a.weight and model.training is False  # the caller's model as it came
    path = tmp_path / "m.zbit"
    assert zb.save(r, path) == os.path.getsize(path) == r.file_bytes <= r.budget.limit(r.graph)
    loaded = zb.load(path, TiedMLP())
    assert loaded.b.weight is loaded.a.weight and not torch.equal(loaded.b.bias, loaded.a.bias)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))


class HandTiedLM(nn.Module):
    """Token ids → logits over the vocabulary by the embedding table itself, read by the model's own code
    (``F.linear(h, wte.weight)``, as nanoGPT-style models write a tied output projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.fc1, self.fc2, self.ln = nn.Embedding(60, 32), nn.Linear(32, 64), nn.Linear(64, 32), \
            nn.LayerNorm(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return torch.nn.functional.linear(self.ln(h), self.wte.weight)


def test_a_weight_the_model_code_reads_itself_is_the_quantized_one(tmp_path) -> None:
    """The compressed model computes its logits with the table as the file stores it (4-bit here), in training
    (straight-through) and in eval: what it measured is what loads."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        return HandTiedLM().eval()

    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 60, (8, 12), generator=g) for _ in range(6)]
    r = zb.compress(build(), data[0][:1], zb.Size(fraction=1 / 6), "uniform", train_data=data[:4],
                    eval_data=data[4:], task="distillation", finetune_config=zb.FinetuneConfig(epochs=0.5),
                    progress=False)
    assert max(r.policy["wte"].bits) <= 4
    table = r.model.wte
    assert not torch.equal(table.weight, table.layer.weight)  # the float table is what training updates
    r.save(tmp_path / "m.zbit")
    loaded = zb.load(tmp_path / "m.zbit", build(), example_inputs=data[0][:1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[5]), r.model.eval()(data[5]), atol=1e-5, rtol=1e-5)
