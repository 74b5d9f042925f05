"""Model code written elsewhere × every strategy: compress at 1/16, save, load into a fresh object, compare.

Each case runs one cheap compress (no fine-tuning, a few AJPQ episodes) and then checks, collecting every
failed check into one message so a case reports all of its problems at once:

- the file on disk has exactly `result.file_bytes` bytes, and at most the budget's limit;
- `zerobit.load(path, fresh model)` gives the outputs of `result.model` in eval mode;
- for strategies that prune channels, some layer of the loaded model really has fewer output channels.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from models_elsewhere import MODELS  # tests/ is on sys.path (conftest)
from torch import nn

import zerobit as zb
from zerobit.data.loaders import TensorData
from zerobit.strategies import get_strategy

torch.set_num_threads(1)

CHANNEL_PRUNING = {"uniform", "sequential", "ajpq"}  # opq/admm remove weights, whole channels only when empty
STRATEGY_OPTIONS = {
    "ajpq": {"episodes": 4, "warmup": 2, "rerank": 2, "proxy.samples": 128, "proxy.recovery_batches": 2,
             "proxy.batch_size": 64},
    "admm": {"iterations": 2},
}


def _data(example: torch.Tensor, n: int, classes: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *example.shape[1:]), generator=g)
    return TensorData(x, torch.randint(0, classes, (n,), generator=g))


def _out_channels(model: nn.Module) -> list[int]:
    return [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("strategy", sorted(zb.STRATEGIES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_compress_save_load(model_name: str, strategy: str, tmp_path) -> None:
    if model_name.startswith("hf_"):
        pytest.importorskip("transformers", reason="the hf_* cases need `pip install transformers`")
    build = MODELS[model_name]
    model, example, classes = build(0)
    train, val = _data(example, 256, classes, 1), _data(example, 128, classes, 2)
    strat = get_strategy(strategy, **STRATEGY_OPTIONS.get(strategy, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zb.compress(model, example, zb.Size(fraction=1 / 16), strat, train_data=train, eval_data=val,
                             finetune_config=zb.FinetuneConfig(epochs=0), progress=False)
    path = tmp_path / "m.zbit"
    written = result.save(path)

    problems: list[str] = []
    on_disk = os.path.getsize(path)
    if not on_disk == written == result.file_bytes:
        problems.append(f"bytes on disk {on_disk}, save() returned {written}, result.file_bytes {result.file_bytes}")
    limit = result.budget.limit(result.graph)
    if on_disk > limit:
        problems.append(f"file {on_disk} B over the budget {limit:.0f} B")

    try:
        fresh, _, _ = build(0)
        loaded = zb.load(path, fresh)
    except Exception as exc:  # noqa: BLE001 - reported with the other checks
        problems.append(f"zb.load raised {type(exc).__name__}: {exc}")
    else:
        batch = torch.randn((8, *example.shape[1:]), generator=torch.Generator().manual_seed(3))
        try:
            with torch.no_grad():
                want = result.model.eval()(batch)
                got = loaded.eval()(batch)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"loaded outputs differ from result.model: {type(exc).__name__}: {str(exc)[:300]}")
        if strategy in CHANNEL_PRUNING:
            before, after = _out_channels(model), _out_channels(loaded)
            if not sum(after) < sum(before):
                problems.append(f"no output channel removed in the loaded model ({sum(after)} of {sum(before)})")

    assert not problems, f"{model_name} × {strategy}:\n  " + "\n  ".join(problems)
