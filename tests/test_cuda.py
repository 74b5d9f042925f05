"""On a CUDA GPU: every registered strategy compresses, saves and loads back to the same predictions.

The CUDA cases are skipped where torch sees no GPU (CI never has one); run them on a GPU machine:
`pytest tests/test_cuda.py`. The same cases run on the CPU everywhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import train_tiny

import zerobit
from zerobit import FinetuneConfig, Size, compress
from zerobit.device import model_device
from zerobit.strategies import STRATEGIES, get_strategy
from zerobit.train.evaluate import predictions

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]

OPTIONS = {"ajpq": {"episodes": 4, "warmup": 2, "rerank": 2, "proxy.samples": 100, "proxy.recovery_batches": 1},
           "admm": {"iterations": 2}}


@pytest.fixture(scope="module")
def teacher(digits):
    return train_tiny("residual", digits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("quantizer", ["mse", "lsq"])
def test_compress_save_load_on_the_device(device, strategy, quantizer, teacher, digits, tmp_path):
    r = compress(teacher, digits.train.x[:1], Size(fraction=1 / 5), get_strategy(strategy, **OPTIONS.get(strategy, {})),
                 train_data=digits.train, eval_data=digits.val,
                 finetune_config=FinetuneConfig(epochs=0.5, quantizer=quantizer), progress=False, device=device)
    assert model_device(r.model).type == device and model_device(teacher).type == "cpu"
    path = tmp_path / "m.zbit"
    assert r.save(path) == path.stat().st_size == r.file_bytes
    back = zerobit.load(path, teacher, device=device)
    assert model_device(back).type == device
    assert torch.equal(predictions(back, digits.test), predictions(r.model, digits.test))
    assert r.accuracy > 0.3  # far above chance (10%) on digits
