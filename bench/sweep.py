"""A budget sweep on a local Ray cluster vs the same runs one after another, and the report of it under docs/.

Both sweeps run the same (strategy, budget) runs with the same settings: first as Ray tasks of a local Ray
instance (one CPU per run, so the 2-core machine runs two at once), then here in turn (each run using every
core). Writes bench/results/sweep_<epochs>ep.json (wall times, their ratio, every run's accuracy and bytes),
draws the report of the half that ran last (both halves run the same policies) with the peer's measured files at
the same fine-tune epochs and seed (bench/peer.py's rows of bench/results/compression.json) as grey crosses, copies
its report.html and figures to docs/sweep/<epochs>ep/, and re-renders BENCHMARKS.md:

    python bench/sweep.py --budgets 1/16,1/32,1/64,1/128 --strategies uniform,opq,ajpq --epochs 0.1 \\
        --option ajpq:episodes=30 --option ajpq:warmup=10

Where both halves do not fit one sitting (the 3-epoch sweep takes hours on 2 cores), `--only ray` runs and records
the Ray half, and a later `--only serial` with the same settings runs the other half, completes that record and
draws the report again from its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.cli import parse_options, split_budgets  # noqa: E402
from zerobit.sweeps import sweep  # noqa: E402

RESULTS = ROOT / "bench" / "results"  # sweep_<epochs>ep.json, one record per fine-tune budget
DOCS = ROOT / "docs" / "sweep"  # <epochs>ep/: the sweep's report.html and figures


def peer_points(model: str, epochs: float, seed: int, table: Path = RESULTS / "compression.json") -> list[dict]:
    """The peer's measured files at this model, fine-tune epochs and seed (bench/peer.py's rows of the compression
    table) as report points: one per format whose file met its budget; none when the table has no such row."""
    rows = json.loads(table.read_text()) if table.exists() else []
    points = []
    for row in rows:
        if not row["strategy"].startswith("peer") or (row["model"], row["epochs"], row["seed"]) != (model, epochs, seed):
            continue
        for fmt, measured in row.get("info", {}).get("formats", {}).items():
            if "accuracy" in measured:  # an infeasible format holds only the smallest bytes it could reach
                points.append({"label": f"Torch-Pruning + onnxruntime {fmt} (.onnx), budget {row['budget']}",
                               "accuracy": measured["accuracy"], "file_bytes": measured["file_bytes"]})
    return points


def publish(out: Path, docs: Path, peers: list[dict]) -> None:
    """Draw the report of the sweep in `out` with `peers` and copy it (HTML and PNGs) to `docs`."""
    from zerobit.report import write_report

    meta = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps(meta | {"peer": peers}, indent=1))
    write_report(out)
    shutil.rmtree(docs, ignore_errors=True)
    shutil.copytree(out / "figures", docs / "figures")
    shutil.copy(out / "report.html", docs / "report.html")


def _results(wall: dict) -> dict[str, dict]:
    """result.json of every finished run of one sweep, by run name."""
    return {r["name"]: json.loads((wall["out"] / r["dir"] / "result.json").read_text())
            for r in wall["summary"]["runs"] if r["status"] == "done"}


def _settings(record: dict) -> dict:
    return {k: record[k] for k in ("model", "budgets", "strategies", "epochs", "seed", "options")}


def _add_serial(record: dict, wall: dict) -> dict:
    """`record` (the Ray half) with the serial sweep's wall time, per-run accuracy and seconds, and the ratio."""
    serial_runs = _results(wall)
    record["serial_seconds"] = wall["wall_seconds"]
    for row in record["rows"]:
        row["serial_accuracy"] = serial_runs.get(row["name"], {}).get("accuracy")
        row["serial_run_seconds"] = serial_runs.get(row["name"], {}).get("seconds")
    record["speedup"] = record["serial_seconds"] / record["ray_seconds"]
    return record


def _record(args: argparse.Namespace, budgets: list[str], strategies: list[str], options: dict, walls: dict) -> dict:
    """What bench/results/sweep_<epochs>ep.json holds: each run of the Ray sweep (and, once run, the same run done serially)."""
    ray_runs = _results(walls["ray"])
    record = {
        "model": args.model, "budgets": budgets, "strategies": strategies, "epochs": args.epochs, "seed": args.seed,
        "options": options, "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or 'x86_64'})",
        "runs": len(budgets) * len(strategies),
        "ray_seconds": walls["ray"]["wall_seconds"], "serial_seconds": walls.get("serial", {}).get("wall_seconds"),
        "rows": [{"name": name, "strategy": r["strategy"], "budget": r["budget_text"], "accuracy": r["accuracy"],
                  "file_bytes": r["file_bytes"], "ratio": r["ratio"], "ray_run_seconds": r["seconds"],
                  "serial_accuracy": None, "serial_run_seconds": None}
                 for name, r in ray_runs.items()],
        "failed": {r["name"]: r.get("error", r["status"]) for r in walls["ray"]["summary"]["runs"]
                   if r["status"] != "done"},
        "baseline_accuracy": walls["ray"]["summary"]["baseline_accuracy"]}
    return _add_serial(record, walls["serial"]) if "serial" in walls else record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--budgets", default="1/16,1/32,1/64,1/128")
    ap.add_argument("--strategies", default="uniform,opq,ajpq")
    ap.add_argument("--option", action="append", default=[], metavar="STRATEGY:KEY=VALUE")
    ap.add_argument("--epochs", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_sweep")
    ap.add_argument("--only", choices=("ray", "serial"),
                    help="one half: ray (recorded without a ratio), or serial (completes the recorded Ray half, "
                         "which must have the same settings)")
    args = ap.parse_args()
    options: dict[str, list[str]] = {}
    for item in args.option:
        strategy, _, setting = item.partition(":")
        options.setdefault(strategy, []).append(setting)
    common = {"model": args.model, "finetune_epochs": args.epochs, "seed": args.seed, "device": "cpu",
              "options": {k: parse_options(v) for k, v in options.items()}}
    budgets, strategies = split_budgets(args.budgets), args.strategies.split(",")
    tag = f"{args.epochs:g}ep"
    results, docs = RESULTS / f"sweep_{tag}.json", DOCS / tag
    settings = {"model": args.model, "budgets": budgets, "strategies": strategies, "epochs": args.epochs,
                "seed": args.seed, "options": common["options"]}
    if args.only == "serial":
        recorded = json.loads(results.read_text()) if results.exists() else None
        if recorded is None or _settings(recorded) != settings:
            print(f"--only serial completes a Ray half recorded with the same settings; {results} has "
                  f"{_settings(recorded) if recorded else 'none'}, this run {settings}", file=sys.stderr)
            return 2
    walls = {}
    for mode, address in (("ray", "local"), ("serial", None)):
        if args.only and mode != args.only:
            continue
        out = Path(args.out) / mode
        shutil.rmtree(out, ignore_errors=True)  # timed from scratch
        start = time.perf_counter()
        summary = sweep(budgets, strategies, out, ray_address=address, cpus_per_run=1, report=False, **common)
        walls[mode] = {"wall_seconds": time.perf_counter() - start, "summary": summary, "out": out}
        if address:
            import ray

            ray.shutdown()  # nothing of it stays to share the cores with the serial sweep
        print(f"{mode}: {walls[mode]['wall_seconds']:.0f} s")
        for r in summary["runs"]:  # a budget a strategy cannot meet is a result too (the report lists it)
            if r["status"] != "done":
                print(f"{mode}: {r['name']} {r['status']}: {r.get('error', '')}")
    if args.only == "serial":
        record = _add_serial(recorded, walls["serial"])
    else:
        record = _record(args, budgets, strategies, common["options"], walls)
    last = list(walls)[-1]
    peers = peer_points(args.model, args.epochs, args.seed)
    publish(walls[last]["out"], docs, peers)
    record |= {"report": str((docs / "report.html").relative_to(ROOT)), "report_from": last,
               "peer_points": len(peers)}
    results.write_text(json.dumps(record, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
