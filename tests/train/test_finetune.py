"""The fine-tune survives a divergence: the last good weights come back at half the learning rate."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODELS

from zerobit.train.finetune import MAX_RESTARTS, FinetuneConfig, finetune


def _nan_at(steps: set[int]):
    calls = {"n": 0}

    def penalty() -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] in steps else 0.0)

    return penalty


def test_non_finite_loss_restores_and_halves_the_rate(digits):
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]()
    hist = finetune(model, digits.train, FinetuneConfig(seed=0), progress=False, penalty=_nan_at({8, 30}),
                    steps=40)
    assert hist["restarts"] == [7, 28] and len(hist["loss"]) == hist["steps"] == 40
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def test_a_healthy_run_never_restarts_and_repeats_exactly(digits):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TINY_MODELS["plain"]()
        hist = finetune(model, digits.train, FinetuneConfig(epochs=0.5, seed=1), progress=False)
        runs.append((hist["loss"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and not hist["restarts"]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_gives_up_with_a_clear_error_after_repeated_divergence(digits):
    model = TINY_MODELS["plain"]()
    with pytest.raises(FloatingPointError, match=f"diverged {MAX_RESTARTS + 1} times"):
        finetune(model, digits.train, FinetuneConfig(epochs=1), progress=False,
                 penalty=lambda: torch.tensor(float("inf")))
