from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny models run fastest on one thread, and tests never oversubscribe the 2 cores

from tiny_models import EXAMPLE, TINY_MODELS  # noqa: E402


@contextmanager
def all_cores():
    """Full-size models (ResNet-20 on 10k test images) run on up to 2 cores inside, then back to one thread."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from zerobit.data import get_splits

    return get_splits("digits")


def train_tiny(name: str, splits, epochs: int = 15, seed: int = 0) -> torch.nn.Module:
    """A tiny model trained on digits for a few seconds (SGD at a constant rate, zerobit's training loop)."""
    from zerobit.data.loaders import Batches
    from zerobit.train.loop import LoopSpec, fit

    torch.manual_seed(seed)
    model = TINY_MODELS[name]()
    batches = Batches(splits.train, 64, shuffle=True, seed=seed)
    spec = LoopSpec(steps=epochs * len(batches), lr=0.1, momentum=0.9, nesterov=False, schedule="constant")
    fit(model, batches, spec, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def trained_residual(digits):
    return train_tiny("residual", digits)


@pytest.fixture(scope="session")
def trained_plain(digits):
    return train_tiny("plain", digits)


__all__ = ["EXAMPLE", "TINY_MODELS", "train_tiny"]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs for the whole session (its workers can import the tests' models)."""
    import os

    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'zerobit[ray]'")
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
