"""Budget sweeps: one compress run per (strategy, budget), as Ray tasks or here in turn, resumable, then a report.

Layout of the output folder DIR:

    DIR/sweep.json              settings, the runs and their status (done / failed / left), wall time
    DIR/runs/NAME/result.json   each run's numbers (written last: a run with it is finished and never redone)
    DIR/runs/NAME/model.zbit    each run's file; policy.json; ajpq.state / sbs.state (a search's progress)
    DIR/report.html             `zerobit report DIR` (written at the end of a sweep)

A killed sweep started again with the same settings skips finished runs, and an AJPQ search picks up from its
saved state. With `ray_address` (or ``--ray-address``) every run is a Ray task holding `cpus_per_run` CPUs and
`gpus_per_run` GPUs: "local" starts a Ray instance on this machine; "auto" joins the cluster this machine belongs
to; "HOST:PORT" joins that head node (DIR must then be a folder every node sees, e.g. NFS, for finished runs to
be found again; the driver also writes each run's files when they come back). Without it the runs go here, in
turn, each using every core.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

RESULT_FILES = ("model.zbit", "policy.json", "result.json")


@dataclass(frozen=True)
class SweepRun:
    """One compress run of a sweep."""

    strategy: str
    budget: str

    @property
    def name(self) -> str:
        return f"{self.strategy}@{re.sub(r'[^A-Za-z0-9.=,-]+', '_', self.budget)}"


@dataclass(frozen=True)
class SweepSettings:
    """What every run of a sweep shares; a finished run is reused only when these (and its run) match."""

    model: str = "resnet20"
    data: str = "fashion-mnist"
    finetune_epochs: float = 1.0
    seed: int = 0
    act_bits: int = 8
    device: str = "auto"
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per strategy: its settings
    finetune: tuple[tuple[str, Any], ...] = ()  # other FinetuneConfig fields

    def options_for(self, strategy: str) -> dict:
        return dict(dict(self.options).get(strategy, ()))

    def key(self, run: SweepRun) -> dict:
        return {"model": self.model, "data": self.data, "finetune_epochs": self.finetune_epochs, "seed": self.seed,
                "act_bits": self.act_bits, "strategy": run.strategy, "budget": run.budget,
                "finetune": dict(self.finetune),
                "options": {k: v for k, v in self.options_for(run.strategy).items() if k != "checkpoint"}}


def run_one(settings: SweepSettings, run: SweepRun, folder: str, objects: tuple | None = None) -> dict[str, bytes]:
    """Compress for one run into `folder`; returns its files' bytes (the driver may be on another machine).

    `objects` = (model, example_inputs, train_data, eval_data, test_data) of a model of your own; None: the zoo
    model and the data set named in `settings`."""
    import torch

    from zerobit.api import compress
    from zerobit.budget import parse_budget
    from zerobit.cli import run_compress
    from zerobit.strategies import get_strategy
    from zerobit.train.finetune import FinetuneConfig

    options = settings.options_for(run.strategy)
    Path(folder).mkdir(parents=True, exist_ok=True)
    if run.strategy in ("ajpq", "sbs"):  # a killed sweep resumes the search too
        options.setdefault("checkpoint", str(Path(folder) / f"{run.strategy}.state"))
    extra = {"sweep_key": settings.key(run), "budget_text": run.budget, "finetune_epochs": settings.finetune_epochs,
             "seed": settings.seed}
    if objects is None:
        run_compress(settings.model, settings.data, run.budget, run.strategy, settings.finetune_epochs, folder,
                     settings.act_bits, settings.seed, progress=False, options=options, device=settings.device,
                     finetune=dict(settings.finetune), extra=extra)
    else:
        model, example, train, val, test = objects
        torch.manual_seed(settings.seed)
        config = FinetuneConfig(**({"epochs": settings.finetune_epochs, "seed": settings.seed}
                                   | dict(settings.finetune)))
        result = compress(model, example, parse_budget(run.budget), get_strategy(run.strategy, **options),
                          train_data=train, eval_data=val, test_data=test, finetune_config=config,
                          act_bits=settings.act_bits, progress=False, device=settings.device)
        result.save_folder(folder, extra | {"data": settings.data})
    return {name: (Path(folder) / name).read_bytes() for name in RESULT_FILES}


def finished(settings: SweepSettings, run: SweepRun, folder: Path) -> dict | None:
    """The run's result when `folder` holds a finished run of exactly these settings, else None."""
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    same = result.get("sweep_key") == json.loads(json.dumps(settings.key(run)))
    return result if same and (folder / "model.zbit").exists() else None


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:  # result.json last: it marks the run finished
        tmp = folder / f"{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, folder / name)


def sweep(budgets: Sequence[str], strategies: Sequence[str], out: str | os.PathLike, *,
          model: str | nn.Module = "resnet20", data: str = "fashion-mnist", example_inputs: Any = None,
          train_data: Any = None, eval_data: Any = None, test_data: Any = None, finetune_epochs: float = 1.0,
          seed: int = 0, act_bits: int = 8, options: dict[str, dict] | None = None, finetune: dict | None = None,
          device: str = "auto", ray_address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
          progress: bool = True, report: bool = True) -> dict:
    """Run every (strategy, budget) pair (see the module docstring) and return what DIR/sweep.json holds.

    Args:
        budgets: budget texts as `zerobit compress --budget` takes them ("1/32", "bops=1/64", "40KB", …).
        strategies: registered strategy names; `options` gives each its settings, e.g. {"ajpq": {"episodes": 60}}.
        model: a zoo model's name (with `data`, a data set's name), or your own model with `example_inputs`,
            `train_data`, `eval_data` and optionally `test_data` as `compress` takes them (`data` then only
            names them in the results; they are sent to Ray once, not per run).
        finetune: other FinetuneConfig fields, e.g. {"lr": 0.02}.
        ray_address: None (here, in turn), "local" (a Ray instance on this machine), "auto" or "HOST:PORT".
        cpus_per_run, gpus_per_run: Ray resources of each run (fractions of a GPU share one).

    Example:
        >>> # zerobit.sweep(["1/32", "1/64"], ["uniform", "opq"], "runs/sweep", ray_address="local")
    """
    objects = None
    if isinstance(model, nn.Module):
        if example_inputs is None or train_data is None or eval_data is None:
            raise ValueError("a model of your own needs example_inputs, train_data and eval_data")
        objects, model = (model, example_inputs, train_data, eval_data, test_data), type(model).__name__
    _check(budgets, strategies, options or {})
    settings = SweepSettings(model, data, float(finetune_epochs), seed, act_bits, device,
                             tuple((s, tuple(sorted((options or {}).get(s, {}).items()))) for s in strategies),
                             tuple(sorted((finetune or {}).items())))
    runs = [SweepRun(s, b) for s in strategies for b in budgets]
    root = Path(out)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "data": data, "finetune_epochs": float(finetune_epochs), "seed": seed,
            "budgets": list(budgets), "strategies": list(strategies), "options": options or {}, "device": device,
            "mode": "ray" if ray_address else "local", "ray_address": ray_address, "cpus_per_run": cpus_per_run,
            "gpus_per_run": gpus_per_run}
    ledger = _Ledger(settings, runs, root, meta, progress)
    try:
        if ray_address:
            _on_ray(settings, ledger.todo, root, objects, ray_address, cpus_per_run, gpus_per_run, ledger.finish,
                    ledger.show)
        else:
            _here(settings, ledger.todo, root, objects, ledger.finish, ledger.show)
    finally:
        ledger.bar.close()
    summary = ledger.save()
    if report:
        from zerobit.report import write_report

        summary["report"] = str(write_report(root))
    return summary


class _Ledger:
    """Where a sweep stands — each run done, left or failed — saved to DIR/sweep.json at every change and shown on a
    progress bar. Runs finished earlier with the same settings count as done and are not run again (`todo`)."""

    def __init__(self, settings: SweepSettings, runs: list[SweepRun], root: Path, meta: dict, progress: bool):
        self.settings, self.runs, self.root, self.meta = settings, runs, root, meta
        self.status = {r.name: "done" if finished(settings, r, root / "runs" / r.name) else "left" for r in runs}
        self.errors: dict[str, str] = {}
        self.todo = [r for r in runs if self.status[r.name] == "left"]
        self.start = time.perf_counter()
        self.bar = tqdm(total=len(runs), initial=len(runs) - len(self.todo), desc="sweep", unit="run",
                        disable=not progress)
        self.save()

    def save(self) -> dict:
        return _save_meta(self.root, self.meta, self.runs, self.status, self.errors, time.perf_counter() - self.start)

    def finish(self, run: SweepRun, files: dict[str, bytes] | None, error: str | None) -> None:
        if error is None:
            if finished(self.settings, run, self.root / "runs" / run.name) is None:  # written on another machine
                _write_files(self.root / "runs" / run.name, files)
            self.status[run.name] = "done"
        else:
            self.status[run.name], self.errors[run.name] = "failed", error
            self.bar.write(f"sweep: {run.name} failed: {error}")
        self.bar.update(1)
        self.save()

    def show(self, running: int) -> None:
        done = sum(v == "done" for v in self.status.values())
        left = sum(v == "left" for v in self.status.values()) - running
        self.bar.set_postfix_str(f"done {done}, running {running}, left {left}, failed {len(self.errors)}")


def _check(budgets: Sequence[str], strategies: Sequence[str], options: dict[str, dict]) -> None:
    """Every budget and strategy must be readable before the first run: a typo fails now, not hours later."""
    if not budgets or not strategies:
        raise ValueError("a sweep needs at least one budget and one strategy")
    from zerobit.budget import parse_budget
    from zerobit.strategies import get_strategy

    for b in budgets:
        try:
            parse_budget(b)
        except ValueError as exc:
            raise ValueError(f"sweep budget {b!r}: {exc}") from exc
    for s in strategies:
        get_strategy(s, **options.get(s, {}))


def _here(settings: SweepSettings, todo: list[SweepRun], root: Path, objects: tuple | None, finish: Any,
          show: Any) -> None:
    """The runs one after another in this process; one failed run does not stop the others."""
    for run in todo:
        show(1)
        try:
            files, error = run_one(settings, run, str(root / "runs" / run.name), objects), None
        except Exception as exc:
            files, error = None, f"{type(exc).__name__}: {exc}"
        finish(run, files, error)


def _on_ray(settings: SweepSettings, todo: list[SweepRun], root: Path, objects: tuple | None, address: str,
            cpus: float, gpus: float, finish: Any, show: Any) -> None:
    from zerobit.parallel import cluster_cpus, connect

    ray = connect(None if address == "local" else address)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_one)
    shared = ray.put(objects) if objects is not None else None  # sent once, not once per run
    pending = {task.remote(settings, run, str((root / "runs" / run.name).resolve()), shared): run for run in todo}
    slots = max(1, int(cluster_cpus() // max(cpus, 1e-3)))
    while pending:
        show(min(slots, len(pending)))
        ready, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready[0])
        try:
            files, error = ray.get(ready[0]), None
        except Exception as exc:  # a failed task: keep its own error, not Ray's wrapping
            cause = getattr(exc, "cause", None) or exc
            files, error = None, f"{type(cause).__name__}: {cause}"
        finish(run, files, error)


def _save_meta(root: Path, meta: dict, runs: list[SweepRun], status: dict, errors: dict, wall: float) -> dict:
    results = {}
    for r in runs:
        if status[r.name] == "done":
            try:
                results[r.name] = json.loads((root / "runs" / r.name / "result.json").read_text())
            except (OSError, ValueError):
                continue
    first = next(iter(results.values()), {})
    summary = meta | {
        "runs": [{"name": r.name, "strategy": r.strategy, "budget": r.budget, "dir": f"runs/{r.name}",
                  "status": status[r.name]} | ({"error": errors[r.name]} if r.name in errors else {}) for r in runs],
        "wall_seconds": wall, "baseline_accuracy": first.get("baseline_accuracy"),
        "fp32_bytes": first.get("fp32_bytes"), "fp32_bops": first.get("fp32_bops")}
    old = root / "sweep.json"
    if old.exists():  # keep what others added (e.g. peer rows)
        try:
            summary = {k: v for k, v in json.loads(old.read_text()).items() if k not in summary} | summary
        except ValueError:
            pass
    tmp = root / "sweep.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, old)
    return summary
