"""bench/sweep.py's peer points: only the peer's files that met their budget, at the sweep's epochs and seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sweep import peer_points  # noqa: E402


def _peer(budget: str, epochs: float, formats: dict) -> dict:
    return {"model": "resnet20", "budget": budget, "strategy": "peer: torch-pruning + ORT", "epochs": epochs,
            "seed": 0, "info": {"formats": formats}}


def test_peer_points_are_the_files_that_met_their_budget_at_the_same_epochs(tmp_path: Path):
    table = tmp_path / "compression.json"
    table.write_text(json.dumps([
        _peer("1/32", 3.0, {"int8": {"file_bytes": 32656, "accuracy": 0.8999},
                            "int4": {"file_bytes": 34534, "accuracy": 0.8932}}),
        _peer("1/64", 3.0, {"int8": {"infeasible": 27459}, "int4": {"infeasible": 20074}}),
        _peer("1/32", 0.25, {"int8": {"file_bytes": 32656, "accuracy": 0.81}}),
        {"model": "resnet20", "budget": "1/32", "strategy": "uniform", "epochs": 3.0, "seed": 0, "accuracy": 0.92,
         "file_bytes": 34262}]))
    points = peer_points("resnet20", 3.0, 0, table)
    assert [(p["file_bytes"], p["accuracy"]) for p in points] == [(32656, 0.8999), (34534, 0.8932)]
    assert all("1/32" in p["label"] and ".onnx" in p["label"] for p in points)
    assert peer_points("resnet20", 3.0, 1, table) == [] and peer_points("resnet20", 1.0, 0, tmp_path / "none") == []
