"""bench/report_latency.py's latency-table check: calibration rows are shown but not counted, widths ×8 and ×1
summed apart, the earlier one-policy fit beside."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.report_latency import table_check_lines  # noqa: E402


def _row(measured: float, predicted: float, multiple: int = 1, calibration: bool = False) -> dict:
    return {"model": "m", "batch": 1, "keep": 0.5, "bits": 8, "multiple": multiple, "measured_ms": measured,
            "predicted_ms": predicted, "table_ms": predicted / 2, "error": predicted / measured - 1,
            "single_error": 2 * predicted / measured - 1, "calibration": calibration}


def test_calibration_rows_are_not_counted_and_aligned_widths_are_summed_apart():
    rows = [_row(1.0, 1.0, calibration=True), _row(1.0, 1.5), _row(2.0, 2.2, multiple=8)]
    head, *rest = table_check_lines(rows, "CPU")
    assert "all: mean |error| 30%, largest 50%" in head  # (50% + 10%) / 2: the calibration row left out
    assert "widths ×8: mean |error| 10%, largest 10%" in head
    assert "widths ×1: mean |error| 50%, largest 50%" in head
    assert "3/4 policy alone — mean |error| 160%, largest 200%" in head  # 2 × predicted vs measured
    table = [line for line in rest if line.startswith("| m |")]
    assert len(table) == 3 and "calibration" in table[0] and "+50%" in table[1] and "×8" in table[2]
    assert table[1].endswith("| +200% |")
