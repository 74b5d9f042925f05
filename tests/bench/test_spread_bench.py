"""bench/spread.py's summary: a gap is only counted between runs that differ in the one thing its column names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.report_compression import spread_section  # noqa: E402
from bench.spread import summarise  # noqa: E402


def _run(budget: str, seed: int, threads: int, repeat: int, accuracy: float) -> dict:
    return {"budget": budget, "seed": seed, "threads": threads, "repeat": repeat, "accuracy": accuracy,
            "file_bytes": 16668, "device": "cpu", "seconds": 300.0}


def test_gaps_compare_runs_that_differ_in_one_thing_only():
    rows = [_run("1/64", 0, 2, 0, 0.90), _run("1/64", 0, 2, 1, 0.899), _run("1/64", 1, 2, 0, 0.88),
            _run("1/64", 0, 1, 0, 0.892), _run("1/128", 0, 2, 0, 0.83)]
    wide, narrow = summarise(rows)
    assert wide["budget"] == "1/64" and wide["runs"] == 4
    assert wide["gap_seed"] == pytest.approx(2.0)  # seed 1 vs seed 0, both 2 threads, repeat 0
    assert wide["gap_threads"] == pytest.approx(0.8)  # 1 vs 2 threads, seed 0, repeat 0
    assert wide["gap_repeat"] == pytest.approx(0.1)
    assert (wide["min"], wide["max"]) == pytest.approx((88.0, 90.0))
    assert narrow["runs"] == 1 and narrow["stdev"] is None and narrow["gap_seed"] is None
    text = spread_section({"model": "resnet20", "strategy": "uniform", "epochs": 3.0, "rows": rows,
                           "summary": [wide, narrow]})
    assert "| 1/64 | 4 | 89.28 |" in text and "| 88.00–90.00 | 2.00 | 0.80 | 0.10 |" in text
