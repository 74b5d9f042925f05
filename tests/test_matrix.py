"""Tiny models × strategies × budget kinds: each case fits its budget or is refused with a BudgetError, the file
is exactly the estimated size, and the loaded file computes what the measured model computed."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.strategies import get_strategy

BUDGETS = {"size": zb.Size(fraction=1 / 5), "bops": zb.BOPs(fraction=1 / 20), "macs": zb.MACs(fraction=1 / 2)}
OPTIONS = {"ajpq": {"episodes": 4, "warmup": 2, "rerank": 2, "proxy.samples": 100, "proxy.recovery_batches": 1},
           "admm": {"iterations": 2}}
REFUSED = {("opq", "macs"), ("admm", "bops"), ("admm", "macs")}  # strategies that cannot serve the budget kind


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("strategy", sorted(zb.STRATEGIES))
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_case(tmp_path, digits, name, strategy, budget):
    torch.manual_seed(0)
    model = TINY_MODELS[name]().eval()
    strat = get_strategy(strategy, **OPTIONS.get(strategy, {}))
    kind = BUDGETS[budget]

    def run():
        return zb.compress(model, EXAMPLE, kind, strat, train_data=digits.train, eval_data=digits.val,
                           finetune_config=zb.FinetuneConfig(epochs=0.2), progress=False)

    if (strategy, budget) in REFUSED:
        with pytest.raises(zb.BudgetError, match="budget|Size|channel-pruning"):
            run()
        return
    result = run()
    assert result.budget.cost(result.graph, result.policy) <= kind.limit(result.graph)
    path = tmp_path / "m.zbit"
    assert zb.save(result, path) == os.path.getsize(path) == result.file_bytes
    loaded = zb.load(path, TINY_MODELS[name]())
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert zb.read_zbit(path).policy.groups == result.policy.groups
