from __future__ import annotations

import pytest
import torch

from zerobit.quant.uniform import best_clip, codes, fake_quant, fake_quant_activation, qmax, scales


def sqnr_db(w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum()))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_error_within_half_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3)
    b = torch.full((16,), bits)
    wq = fake_quant(w, b)
    step = scales(w, b).view(-1, 1, 1, 1)
    assert ((w - wq).abs() <= step / 2 + 1e-6).all()
    c = codes(w, b, scales(w, b))
    assert torch.equal(c, c.round())  # integer codes
    # symmetric levels −(2^(b−1)−1) … 2^(b−1)−1: each channel's largest weight lands exactly on the top code
    assert torch.equal(c.abs().flatten(1).amax(1), torch.full((16,), 2.0 ** (bits - 1) - 1))
    assert torch.allclose(wq, c * step)


@pytest.mark.parametrize("bits,min_db", [(8, 38.0), (6, 26.0), (4, 14.0), (3, 8.0), (2, 3.0)])
def test_signal_to_quantization_noise(bits, min_db):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    b = torch.full((32,), bits)
    assert sqnr_db(w, fake_quant(w, b, best_clip(w, b))) > min_db


def test_zero_bits_remove_and_float_bits_keep():
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    wq = fake_quant(w, torch.tensor([0, 32, 8]))
    assert torch.equal(wq[0], torch.zeros(5))
    assert torch.equal(wq[1], w[1])
    assert not torch.equal(wq[2], w[2])


def test_straight_through_gradient():
    w = torch.randn(4, 6, requires_grad=True)
    fake_quant(w, torch.full((4,), 3)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("signed", [True, False])
def test_activation_inference_path_equals_training_values(signed):
    x = torch.randn(3, 5, 7, 7) * 4
    trained = fake_quant_activation(x.clone().requires_grad_(), 4, torch.tensor(0.3), signed)
    with torch.no_grad():
        inferred = fake_quant_activation(x, 4, torch.tensor(0.3), signed)
    assert torch.allclose(inferred, trained.detach(), atol=1e-6)
    assert len(inferred.unique()) <= (15 if signed else 16)
    assert (inferred.min() < 0) == signed


def test_clip_search_never_worse_than_max_scaling():
    torch.manual_seed(1)
    w = torch.randn(8, 1000) * torch.linspace(0.1, 3, 8).view(-1, 1)  # Gaussian tails: clipping pays at 3 bits
    b = torch.full((8,), 3)
    clipped = fake_quant(w, b, best_clip(w, b))
    plain = fake_quant(w, b)
    assert (w - clipped).pow(2).sum() <= (w - plain).pow(2).sum()
    assert float(best_clip(w, b)[0]) < 1.0


def test_qmax():
    assert qmax(torch.tensor([2, 4, 8])).tolist() == [1.0, 7.0, 127.0]
