"""What a report reads: the runs of a sweep folder (or one compress folder) and the per-layer rows of a policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the report itself never needs torch
    from zerobit.graph import ModelGraph
    from zerobit.policy import Policy

NEEDED = ("strategy", "file_bytes", "accuracy")  # a result.json without these cannot be plotted or tabled


def layer_rows(graph: ModelGraph, policy: Policy) -> list[dict[str, Any]]:
    """One row per quantized layer: its group, kind, kept/total output channels, mean weight bits, input bits.

    `weight_bits` is the mean over the kept output channels (0.0 when none is kept); `act_bits` the bits of the
    layer's input activations (32 = float). A layer the policy removes whole (its group, or every group it reads;
    zerobit.graph.emptying) keeps 0 channels and says `removed`. `compress()` stores these rows in result.json
    under "layers".

    Example:
        >>> rows = layer_rows(result.graph, result.policy)  # doctest: +SKIP
        >>> rows[0]["layer"], rows[0]["kept"], rows[0]["weight_bits"]  # doctest: +SKIP
        ('conv1', 13, 4.0)
    """
    rows = []
    removed = policy.removed_layers(graph)
    for name, layer in graph.layers.items():
        decision = policy[layer.out_group]
        kept = decision.kept_bits() if name not in removed else []
        rows.append({"layer": name, "group": layer.out_group, "kind": layer.kind, "channels": decision.channels,
                     "kept": len(kept), "weight_bits": round(sum(kept) / len(kept), 4) if kept else 0.0,
                     "act_bits": policy.act_of(name)} | ({"removed": True} if name in removed else {}))
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged (not valid JSON: {exc}); rerun the step that wrote it") from exc


def read_result(path: str | Path) -> dict[str, Any]:
    """The result.json of one compress run, checked for the fields a report needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run was marked done but wrote no result")
    result = _read_json(path)
    if not isinstance(result, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object, got {type(result).__name__}")
    missing = [k for k in NEEDED if k not in result]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a result.json written by zerobit compress")
    return result


def read_runs(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The settings and runs of a sweep folder (DIR/sweep.json) or of one compress output folder (DIR/result.json).

    Each run is {"name", "strategy", "budget", "status" ("done" | "failed" | "left"), "error" (str | None),
    "result" (the run's result.json, None unless done)}. The settings fill baseline_accuracy, fp32_bytes and
    fp32_bops from the results when the sweep left them out.

    Example:
        >>> meta, runs = read_runs("runs/sweep")  # doctest: +SKIP
        >>> [(r["name"], r["status"]) for r in runs]  # doctest: +SKIP
        [('uniform@1_32', 'done'), ('ajpq@1_32', 'failed')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give a sweep folder or a compress output folder")
    sweep, single = folder / "sweep.json", folder / "result.json"
    if sweep.is_file():
        meta, runs = _read_sweep(folder, sweep)
    elif single.is_file():
        meta, runs = _read_single(folder, single)
    else:
        raise FileNotFoundError(f"{folder} holds neither sweep.json (a sweep) nor result.json (one compress run)")
    results = [r["result"] for r in runs if r["result"]]
    for key in ("baseline_accuracy", "fp32_bytes", "fp32_bops"):
        if meta.get(key) is None:
            meta[key] = next((r[key] for r in results if r.get(key) is not None), None)
    return meta, runs


def _read_sweep(folder: Path, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta = _read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("runs"), list):
        raise ValueError(f"{path} is damaged: expected an object with a list of \"runs\"")
    runs = []
    for i, entry in enumerate(meta["runs"]):
        if not isinstance(entry, dict) or not {"name", "status"} <= entry.keys():
            raise ValueError(f"{path}: run {i} lacks a name or a status")
        done = entry["status"] == "done"
        if done and "dir" not in entry:
            raise ValueError(f"{path}: run {entry['name']!r} is done but names no \"dir\"")
        result = read_result(folder / entry["dir"] / "result.json") if done else None
        runs.append({"name": entry["name"], "strategy": entry.get("strategy") or (result or {}).get("strategy", "?"),
                     "budget": entry.get("budget") or _budget_text(result), "status": entry["status"],
                     "error": entry.get("error"), "result": result})
    meta = {k: v for k, v in meta.items() if k != "runs"}
    meta.setdefault("peer", [])
    return meta, runs


def _read_single(folder: Path, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = read_result(path)
    meta = {"model": result.get("model", "?"), "data": result.get("data", "?"),
            "finetune_epochs": result.get("finetune_epochs"), "seed": result.get("seed"),
            "device": result.get("device"), "mode": "one compress run", "wall_seconds": result.get("seconds"),
            "peer": []}
    run = {"name": folder.resolve().name, "strategy": result["strategy"], "budget": _budget_text(result),
           "status": "done", "error": None, "result": result}
    return meta, [run]


def _budget_text(result: dict[str, Any] | None) -> str:
    if not result:
        return "?"
    return str(result.get("budget_text") or result.get("budget") or "?")


def done_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that finished (they have a result)."""
    return [r for r in runs if r["status"] == "done" and r["result"]]


def latency_ms(result: dict[str, Any]) -> float | None:
    """The latency measured in onnxruntime for a run under a latency budget (None otherwise)."""
    value = (result.get("info") or {}).get("latency_ms")
    return float(value) if value is not None else None
