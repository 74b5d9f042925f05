"""compress(): the one verb — analyse the model, search a policy under the budget, fine-tune, measure."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zerobit.budget import BOPs, Budget, BudgetError, Latency, MACs, Size, amount, bops, float_policy, macs
from zerobit.data.loaders import TensorData, batches_of, check_data
from zerobit.device import DeviceLike, model_device, move, resolve
from zerobit.export.runtime import save_zbit
from zerobit.export.zbit import estimate_bytes
from zerobit.graph import ModelGraph, analyse
from zerobit.graph.linears import linearized
from zerobit.importance import group_scores
from zerobit.policy import Policy, align_policy, fill_aligned
from zerobit.quant.apply import apply_policy, inference_copy, quant_layers
from zerobit.report.runs import layer_rows
from zerobit.strategies import Problem, Strategy, get_strategy
from zerobit.strategies.base import SearchResult
from zerobit.task import DEFAULT_TASK, Classification, Task, first_tensor, get_task, map_tensors
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm
from zerobit.train.finetune import FinetuneConfig, finetune
from zerobit.train.loop import Checkpoint


@dataclass
class CompressResult:
    """The compressed model and its measured numbers.

    `accuracy` is the task's metric (top-1 accuracy for classification; output similarity for label-free
    distillation), measured on the compressed model exactly as the .zbit file stores it (eval mode decodes the
    stored codes), on `test_data` when given, else on `eval_data`.
    """

    policy: Policy
    model: nn.Module
    graph: ModelGraph
    budget: Budget
    strategy: str
    accuracy: float
    baseline_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    original: nn.Module | None = field(default=None, repr=False)  # the model compressed (for export_onnx)
    train_data: Any = field(default=None, repr=False)  # calibration inputs for export_onnx
    example_inputs: Any = field(default=None, repr=False)  # the input traced (CPU), for export_onnx
    task: Task = field(default=DEFAULT_TASK, repr=False)  # how batches were run and the model judged

    @property
    def file_bytes(self) -> int:
        """Bytes of the .zbit file `save` writes (exact)."""
        return estimate_bytes(self.graph, self.policy)

    def to_dict(self) -> dict[str, Any]:
        g, p = self.graph, self.policy
        ref = float_policy(g)
        return {
            "strategy": self.strategy, "file_bytes": self.file_bytes, "fp32_bytes": g.fp32_bytes,
            "budget": str(self.budget), "budget_limit": self.budget.limit(g), "budget_unit": self.budget.unit,
            "budget_bytes": self.budget.limit(g) if isinstance(self.budget, Size) else None,
            "ratio": g.fp32_bytes / self.file_bytes, "accuracy": self.accuracy,
            "baseline_accuracy": self.baseline_accuracy, "metric": self.task.name, "bops": bops(g, p), "fp32_bops": bops(g, ref),
            "macs": macs(g, p), "fp32_macs": macs(g, ref), "seconds": sum(self.seconds.values()),
            "seconds_by_stage": self.seconds, "info": self.info, "model": g.model_name,
            "device": str(model_device(self.model)), "layers": layer_rows(g, p),
        }

    def summary(self) -> str:
        """Before/after table: size, accuracy, BOPs, MACs."""
        d = self.to_dict()
        metric = "accuracy %" if isinstance(self.task, Classification) else f"{self.task.name} %"[:12]
        rows = [("file bytes", d["fp32_bytes"], d["file_bytes"]), (metric, 100 * d["baseline_accuracy"],
                100 * d["accuracy"]), ("BOPs", d["fp32_bops"], d["bops"]), ("MACs", d["fp32_macs"], d["macs"])]
        lines = [f"{'':12} {'fp32':>14} {'compressed':>14} {'ratio':>8}"]
        for name, before, after in rows:
            ratio = f"{before / after:.1f}×" if name != metric and after else f"{after - before:+.2f}"
            fmt = "{:>14.2f}" if name == metric else "{:>14,.0f}"
            lines.append(f"{name:12} {fmt.format(before)} {fmt.format(after)} {ratio:>8}")
        if "latency_ms" in self.info:
            lines.append(f"latency: {self.info['latency_ms']:.3f} ms measured in onnxruntime (predicted "
                         f"{self.info['latency_predicted_ms']:.3f}; budget {self.budget.limit(self.graph):.3f} ms)")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> int:
        """Write the .zbit file; returns its size in bytes."""
        return save_zbit(self.model, self.graph, self.policy, path)

    def save_folder(self, out: str | os.PathLike, extra: dict | None = None) -> dict:
        """Write OUT/model.zbit, OUT/policy.json and, last, OUT/result.json (the numbers, plus `extra`); returns
        what result.json holds. result.json appears only complete (written aside, then renamed), so its presence
        marks a finished run (sweeps resume by it)."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        written = self.save(folder / "model.zbit")
        self.policy.save(str(folder / "policy.json"))
        summary = self.to_dict() | {"file_bytes": os.path.getsize(folder / "model.zbit"), "written_bytes": written}
        summary |= extra or {}
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, folder / "result.json")
        return summary


def _check_inputs(model: nn.Module, example_inputs: Any, budget: Budget, data: Any, eval_data: Any,
                  channel_multiple: Any = None) -> None:
    if channel_multiple is not None and (isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int)
                                         or channel_multiple < 1):
        raise ValueError(f"channel_multiple must be a whole number ≥ 1 (1 = any width), not {channel_multiple!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(budget, (Size, BOPs, MACs, Latency)):
        raise TypeError(f"budget must be zerobit.Size, BOPs, MACs or Latency, got {type(budget).__name__}")
    check_data(data, "train_data")
    check_data(eval_data, "eval_data")
    first_tensor(example_inputs)  # a clear TypeError when it holds no tensor
    finite = []
    map_tensors(example_inputs, lambda t: finite.append(not t.is_floating_point() or bool(torch.isfinite(t).all())))
    if not all(finite) or (isinstance(data, TensorData) and not torch.isfinite(data.x).all()):
        raise ValueError("inputs contain NaN or infinity")
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"the model's weights contain NaN or infinity (in {bad[:3]}); load a healthy checkpoint")


def _check_finite(qmodel: nn.Module) -> None:
    """A model with NaN or infinite numbers is never reported or returned (it would score ~chance, silently)."""
    bad = {n: parts for n, q in quant_layers(qmodel).items() if (parts := q.non_finite_parts())}
    if bad:
        where = "; ".join(f"{n}: {', '.join(p)}" for n, p in list(bad.items())[:3])
        raise FloatingPointError(f"the compressed model holds NaN or infinite numbers ({where}). The fine-tune "
                                 "diverged: lower FinetuneConfig.lr, or check the model's BatchNorm statistics.")


LATENCY_TRIES = 3
LATENCY_CLOSE = 0.9  # a measured latency within 90–100% of the budget is taken at once


def _search(strat: Strategy, problem: Problem, previous: SearchResult | None = None) -> SearchResult:
    """The strategy's search (or `previous.retarget` to the new budget, where it has one), its policy rounded to
    `problem.channel_multiple` where the strategy did not."""
    found = previous.retarget(problem) if previous is not None and previous.retarget else strat.search(problem)
    graph, multiple = problem.graph, problem.channel_multiple
    aligned = align_policy(graph, found.policy, problem.scores, multiple)
    if aligned is found.policy:
        return found
    if not problem.fits(aligned):
        raise BudgetError(f"rounding strategy {strat.name!r}'s policy to multiples of {multiple} channels costs "
                          f"{amount(problem.cost(aligned))} {problem.budget.unit}, over the budget "
                          f"({amount(problem.limit)}); use a smaller channel_multiple or the uniform strategy")
    targets = {n: found.policy[n].kept / g.tie for n, g in graph.groups.items()}
    aligned = fill_aligned(graph, aligned, problem.scores, multiple, targets, problem.fits)
    changed = sum(aligned[n] != found.policy[n] for n in problem.graph.groups)
    # a model the strategy trained under the old policy no longer matches it: start again from its float weights;
    # a retarget (SBS's projection of its trained gates) still answers a tighter budget, rounded again here
    return SearchResult(aligned, None, found.finetune_epochs_used if found.model is None else 0.0,
                        found.info | {"aligned_groups": changed}, found.start_model, found.retarget,
                        finetune_lr=found.finetune_lr)


def next_latency_target(limit: float, seen: list[tuple[float, float]]) -> float:
    """The predicted milliseconds to search under next, from the (predicted, measured) pairs so far: the budget
    scaled by predicted/measured of the last policy; from the second pair on, where the line through the last two
    meets it (measured = a + b·predicted: a, what the table leaves out of every call; b, its scale), when that
    line rises. Aimed 2% under the budget after a policy over it.

    Example:
        >>> # this machine measures 0.5 ms + 2 × the table's prediction
        >>> round(next_latency_target(1.0, [(0.5, 1.5)]), 4)  # by the ratio alone: 1.155 ms measured, still over
        0.3267
        >>> round(next_latency_target(1.0, [(0.5, 1.5), (0.3267, 1.1534)]), 3)  # the line: 0.98 ms measured
        0.24
    """
    predicted, measured = seen[-1]
    goal = limit * (0.98 if measured > limit else 1.0)
    if len(seen) > 1:
        (p0, m0), (p1, m1) = seen[-2], seen[-1]
        if (p1 - p0) * (m1 - m0) > 0:
            return max(0.0, p1 + (goal - m1) * (p1 - p0) / (m1 - m0))
    return goal * predicted / measured


REMEASURE_ROUNDS = 3  # rounds of a re-measurement of a policy measured over its budget


def _measured_ms(problem: Problem, policy, limit: float) -> float:
    """The policy's measured latency; one over `limit` is measured again in REMEASURE_ROUNDS rounds and the
    least kept, so that a busy moment of the machine (another process, a frequency drop) has to last through
    every round to send the search looking again."""
    from zerobit.export.latency import measure_policies

    def least(rounds: int) -> float:
        return measure_policies(problem.model, problem.graph, [policy], problem.example_inputs, problem.train_data,
                                problem.budget.batch, problem.budget.threads, seconds=0.3 * rounds,
                                rounds=rounds)[0]
    measured = least(1)
    return min(measured, least(REMEASURE_ROUNDS)) if measured > limit else measured


def _meet_latency(problem: Problem, strat: Strategy, found: SearchResult) -> SearchResult:
    """Measure the searched policy's real latency and calibrate the table's predictions on this model: while the
    policy is over the budget, or well under it, search again under a predicted-latency target where the line
    through the last two (predicted, measured) pairs meets the budget (the first retry scales the budget by
    predicted/measured; `next_latency_target`), at most LATENCY_TRIES measurements (a search that returns the
    policy just measured ends it). Returns the slowest measured policy that meets the budget."""

    budget, limit, best, seen = problem.budget, problem.limit, None, []
    for attempt in range(1, LATENCY_TRIES + 1):
        measured = _measured_ms(problem, found.policy, limit)
        predicted = problem.budget.cost(problem.graph, found.policy)
        found.info |= {"latency_ms": measured, "latency_predicted_ms": predicted, "latency_tries": attempt,
                       "latency_scale": budget.scale}
        if measured <= limit and (best is None or measured > best.info["latency_ms"]):
            best = found
        if LATENCY_CLOSE * limit <= measured <= limit or attempt == LATENCY_TRIES:
            break
        seen.append((predicted, measured))
        target = next_latency_target(limit, seen)
        if problem.progress:
            print(f"latency: measured {measured:.3f} ms for a {limit:.3f} ms budget (predicted {predicted:.3f}); "
                  f"searching again under {target:.3f} ms predicted")
        retry = dataclasses.replace(budget, ms=target, fraction=None)
        try:
            retry.check_feasible(problem.graph, problem.act_bits, problem.channel_multiple)
        except BudgetError:
            break
        again = _search(strat, dataclasses.replace(problem, budget=retry), previous=found)
        if again.policy == found.policy:  # measured already: the search has nothing else to offer
            break
        found = again
    if best is None:
        raise BudgetError(f"the policy found takes {measured:.3f} ms measured, over the {limit:.3f} ms budget "
                          f"after {attempt} searches; raise the budget or use more threads")
    return best


def compress(model: nn.Module, example_inputs: Any, budget: Budget, strategy: str | Strategy = "uniform",
             *, train_data: Iterable, eval_data: Iterable, test_data: Iterable | None = None,
             finetune_config: FinetuneConfig | None = None, act_bits: int = 8, model_name: str = "",
             progress: bool = True, ignored_layers: list[str] | None = None,
             device: DeviceLike = "auto", task: Task | str | None = None,
             channel_multiple: int | None = None) -> CompressResult:
    """Compress `model` to fit `budget`: choose per-channel bits (0 = removed), fine-tune, measure.

    Args:
        model: a trained model (left unchanged; it is the distillation teacher).
        example_inputs: one input batch for tracing, as the model is called: a tensor (``model(x)``, e.g.
            ``torch.zeros(1, 1, 28, 28)``), a tuple (``model(*x)``) or a dict (``model(**x)``, e.g. a tokenizer's
            output for a Hugging Face model).
        budget: ``Size(...)`` (bytes of the .zbit file), ``BOPs(...)``, ``MACs(...)`` or ``Latency(...)``
            (milliseconds of the exported ONNX model in onnxruntime on this machine, measured; see README).
        strategy: a registered name ("uniform", "sequential", …) or a configured Strategy.
        train_data: fine-tuning data. eval_data: held-out validation split that searches score on. Each is a
            `TensorData` or any re-iterable of batches — a `torch.utils.data.DataLoader` or a list — whose batches
            are tensors, ``(inputs, labels)`` tuples or dicts (``labels`` is the target); see zerobit.task.
        test_data: where the reported metric is measured (default: eval_data).
        finetune_config: the fine-tune budget shared by every strategy (default: FinetuneConfig()).
        act_bits: activation bits (8, or 32 for float activations).
        model_name: zoo name, stored in the file so `zerobit.load(path)` needs no model object.
        progress: show progress bars.
        ignored_layers: names of layers whose output channels are kept (only quantized), besides the output layer.
        device: where everything runs — "auto" (CUDA when available), "cpu", "cuda", "cuda:N" or a torch.device.
            The data may stay on the CPU (batches move one at a time). `model` is put back on its own device and
            in its own train/eval mode afterwards; the compressed model stays on `device`.
        task: how batches are run and judged: "classification" (default; labels, top-1 accuracy),
            "distillation" or ``zerobit.Distillation(distance=...)`` (no labels: match the original model's
            outputs), or your own ``zerobit.Task``.
        channel_multiple: keep a multiple of this many channels in every prunable group (at least this many, or
            all): onnxruntime's integer convolutions run widths of multiples of 8 or 16 about twice as fast as the
            widths just below them (measured in BENCHMARKS.md), so 8 suits a model deployed there. Uniform,
            sequential and AJPQ search over such widths; other strategies' policies are rounded down after
            their search (lowest-importance channels removed first), which keeps them within the budget.
            Default (None): 8 for a `Latency` that widths of multiples of 8 can reach (`default_multiple`), 1
            (any width) otherwise; `result.info["channel_multiple"]` says which.

    Example:
        >>> # r = compress(model, torch.zeros(1, 1, 28, 28), Size(fraction=1/32), "sequential",
        >>> #              train_data=splits.train, eval_data=splits.val, test_data=splits.test)
        >>> # r.save("small.zbit")
    """
    _check_inputs(model, example_inputs, budget, train_data, eval_data, channel_multiple)
    task = get_task(task)
    dev = resolve(device)
    home, was_training = model_device(model), model.training
    try:  # seeded work inside (fine-tune, searches) must not move the caller's own random streams
        with torch.random.fork_rng(devices=_cuda_index(dev)):
            result = _compress(linearized(model.to(dev).eval()), move(example_inputs, dev), budget, strategy,
                               train_data, eval_data, test_data, finetune_config or FinetuneConfig(), act_bits,
                               model_name, progress, ignored_layers, task, channel_multiple)
        result.original, result.train_data = model, train_data
        result.example_inputs = move(example_inputs, torch.device("cpu"))
        return result
    finally:
        model.to(home).train(was_training)


def _cuda_index(dev: torch.device) -> list[int]:
    """The CUDA device whose random stream `compress` keeps apart from the caller's ([] on the CPU)."""
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _finetune_checkpoint(config: FinetuneConfig, policy: Policy, problem: Problem,
                         epochs: float) -> Checkpoint | None:
    """The final fine-tune's checkpoint (FinetuneConfig.checkpoint): it resumes only the same policy, budget,
    model and settings."""
    if not config.checkpoint:
        return None
    settings = {k: v for k, v in config.to_dict().items() if k not in ("checkpoint", "processes")}
    return Checkpoint(config.checkpoint, {"policy": policy.to_dict(), "problem": problem.identity(),
                                          "finetune": settings, "epochs": epochs})


def _compress(model: nn.Module, example_inputs: Any, budget: Budget, strategy: str | Strategy,
              train_data: Iterable, eval_data: Iterable, test_data: Iterable | None,
              finetune_config: FinetuneConfig, act_bits: int, model_name: str, progress: bool,
              ignored_layers: list[str] | None, task: Task, channel_multiple: int | None = None) -> CompressResult:
    clock: dict[str, float] = {}
    t = time.perf_counter()
    strat = get_strategy(strategy)
    strat.check_budget(budget)  # before anything is traced or measured
    graph = analyse(model, example_inputs, ignored_layers)
    graph.model_name = model_name
    if isinstance(budget, Latency):  # calibrated on this model; a fraction of fp32's latency is measured
        budget = budget.measured_against(model, graph, example_inputs, train_data, act_bits)
    if channel_multiple is None:
        channel_multiple = budget.default_multiple(graph, act_bits)
        if channel_multiple != budget.channel_multiple and progress:
            print(f"budget {amount(budget.limit(graph))} {budget.unit} is out of reach of widths of multiples of "
                  f"{budget.channel_multiple}: every width is searched (channel_multiple=1)")
    budget.check_feasible(graph, act_bits, channel_multiple)
    teacher = inference_copy(model, graph)
    task = task.bind(teacher)
    problem = Problem(model, graph, budget, example_inputs, train_data, eval_data, group_scores(model, graph),
                      act_bits, finetune_config, progress, task, channel_multiple)
    report_data = test_data if test_data is not None else eval_data
    baseline = task.metric(model, report_data)
    clock["analyse"] = time.perf_counter() - t
    t = time.perf_counter()
    found = _search(strat, problem)
    if isinstance(budget, Latency):
        found = _meet_latency(problem, strat, found)
    clock["search"] = time.perf_counter() - t
    found.info["channel_multiple"] = channel_multiple
    if not isinstance(budget, Latency) and not problem.fits(found.policy):  # a latency is checked measured
        raise BudgetError(f"strategy {strat.name!r} returned a policy over budget "
                          f"({amount(problem.cost(found.policy))} > {amount(problem.limit)} {budget.unit})")
    t = time.perf_counter()
    start = found.start_model if found.start_model is not None else model
    qmodel = found.model if found.model is not None else apply_policy(start, graph, found.policy, example_inputs)
    calib = batches_of(train_data, 256, shuffle=True, seed=finetune_config.seed)
    if found.model is None:
        recalibrate_batchnorm(qmodel, calib, task=task)
    calibrate_activations(qmodel, calib, task=task)
    epochs = max(0.0, finetune_config.epochs - found.finetune_epochs_used)
    finetune_config = dataclasses.replace(finetune_config, lr=finetune_config.lr * found.finetune_lr)
    finetune(qmodel, train_data, finetune_config, teacher=teacher, progress=progress, epochs=epochs, task=task,
             checkpoint=_finetune_checkpoint(finetune_config, found.policy, problem, epochs))
    clock["finetune"] = time.perf_counter() - t
    _check_finite(qmodel.eval())
    acc = task.metric(qmodel, report_data)
    return CompressResult(found.policy, qmodel, graph, budget, strat.name, acc, baseline, clock, found.info,
                          task=task)
