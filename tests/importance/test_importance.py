from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerobit.data.loaders import TensorData
from zerobit.graph import analyse
from zerobit.importance import Fisher, Magnitude, fisher_scores


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x.flatten(1)))


def test_fisher_matches_hand_computed_per_sample_gradients():
    torch.manual_seed(0)
    model = TwoLinear().eval()
    x = torch.randn(6, 1, 1, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    graph = analyse(model, x[:1])
    got = fisher_scores(model, graph, TensorData(x, y), batches=1, batch_size=6)["hidden"]
    # by hand: h = W1 x + b1 (mask m = 1 on h); dL_n/dm_i = h_i · (W2ᵀ (softmax(z) − onehot))_i
    h = model.hidden(x.flatten(1))
    delta = F.softmax(model.out(h), 1) - F.one_hot(y, 2).float()
    per_sample = h * (delta @ model.out.weight)
    assert torch.allclose(got, per_sample.pow(2).sum(0).detach(), rtol=1e-5, atol=1e-7)


def test_fisher_sums_coupled_copies_before_squaring():
    from tiny_models import EXAMPLE, TINY_MODELS

    torch.manual_seed(0)
    model = TINY_MODELS["residual"]().eval()
    graph = analyse(model, EXAMPLE)
    data = TensorData(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    scores = fisher_scores(model, graph, data, batches=1, batch_size=16)
    # by hand: a separate mask on the output (after BatchNorm) of each of the three coupled layers
    bns = ["a1.2", "a2.2", "stem.1"]
    assert sorted(graph.layers[n].bn for n in graph.groups["stem.0"].layers) == bns
    masks = [torch.ones(16, 8, requires_grad=True) for _ in bns]
    handles = [model.get_submodule(bn).register_forward_hook(lambda _m, _i, out, m=m: out * m[:, :, None, None])
               for bn, m in zip(bns, masks, strict=True)]
    try:
        loss = F.cross_entropy(model(data.x), data.y, reduction="sum")
        grads = torch.autograd.grad(loss, masks)
    finally:
        for h in handles:
            h.remove()
    shared = sum(grads).pow(2).sum(0)  # one mask for the group: the copies' gradients add, then square
    separate = sum(g.pow(2) for g in grads).sum(0)
    assert torch.allclose(scores["stem.0"], shared, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(scores["stem.0"], separate, rtol=0.05)
    # memory normalization divides by the activations the group's three 8×8 layers write per channel
    crit = Fisher(data, batches=1, normalize="memory")
    assert torch.allclose(crit(model, graph, "stem.0") * 3 * 64, scores["stem.0"])
    with pytest.raises(ValueError, match="normalize"):
        Fisher(data, normalize="flops")


def test_magnitude_by_hand():
    model = TwoLinear().eval()
    with torch.no_grad():
        model.hidden.weight.copy_(torch.tensor([[1.0, -1, 1], [0, 0, 3], [2, 2, 2], [0, 0, 0]]))
    graph = analyse(model, torch.zeros(1, 1, 1, 3))
    assert Magnitude(p=1)(model, graph, "hidden").tolist() == [1.0, 1.0, 2.0, 0.0]
    assert torch.allclose(Magnitude(p=2)(model, graph, "hidden"), torch.tensor([1.0, 3**0.5, 2.0, 0.0]))
