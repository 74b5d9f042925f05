"""bench/compression.py's command line: a latency budget keeps its options when several budgets are listed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.compression import split_budgets  # noqa: E402
from zerobit.budget import Latency, parse_budget  # noqa: E402


def test_a_latencys_options_stay_with_it():
    budgets = split_budgets("1/32,latency=1/4,batch=64,threads=1,bops=1/64")
    assert budgets == ["1/32", "latency=1/4,batch=64,threads=1", "bops=1/64"]
    latency = parse_budget(budgets[1])
    assert isinstance(latency, Latency) and (latency.batch, latency.threads) == (64, 1)
