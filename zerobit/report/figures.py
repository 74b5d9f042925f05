"""The report's figures: Pareto fronts of accuracy against each cost, and the searches' progress curves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from zerobit.report.draw import Figure, MaxNLocator, Rendered, render
from zerobit.report.layers import choose_run, layer_figure
from zerobit.report.runs import done_runs, latency_ms

ACCURACY = "accuracy (%)"
MARKERS = "osD^vPX<>hp*"
NAMES = ("pareto_bytes", "pareto_bops", "pareto_latency", "layers", "ajpq_rewards", "sbs_cost")  # every figure


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats (as cheap or cheaper and as accurate or more, one strictly),
    cheapest first; each is more accurate than the one before it.

    Example:
        >>> pareto_front([(3, 0.9), (1, 0.5), (2, 0.4), (2, 0.7), (4, 0.9)])
        [(1, 0.5), (2, 0.7), (3, 0.9)]
    """
    front: list[tuple[float, float]] = []
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((cost, acc))
    return front


@dataclass(frozen=True)
class Axis:
    """One cost axis of a Pareto figure: how to read it from a result, the fp32 model and a peer row."""

    name: str
    label: str
    of_result: Callable[[dict[str, Any]], float | None]
    fp32_key: str | None
    peer_key: str | None


AXES = (Axis("pareto_bytes", "file bytes", lambda r: r.get("file_bytes"), "fp32_bytes", "file_bytes"),
        Axis("pareto_bops", "BOPs", lambda r: r.get("bops"), "fp32_bops", "bops"),
        Axis("pareto_latency", "latency (ms)", latency_ms, None, None))


def pareto_figure(meta: dict[str, Any], runs: list[dict[str, Any]], axis: Axis) -> Rendered | None:
    """Accuracy against one cost, a marker and a step-line front per strategy; None when no run has that cost."""
    by_strategy: dict[str, list[tuple[float, float]]] = {}
    for run in done_runs(runs):
        cost = axis.of_result(run["result"])
        if cost is not None and cost > 0:
            by_strategy.setdefault(run["strategy"], []).append((float(cost), 100 * run["result"]["accuracy"]))
    if not by_strategy:
        return None
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (strategy, points) in enumerate(by_strategy.items()):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, color=color, marker=marker, s=36, alpha=0.75, label=strategy, zorder=3)
        front = pareto_front(points)
        fx, fy = zip(*front, strict=True)
        ax.step(fx, fy, where="post", color=color, lw=1.3, alpha=0.9, zorder=2)
    baseline = meta.get("baseline_accuracy")
    fp32 = meta.get(axis.fp32_key) if axis.fp32_key else None
    if baseline is not None and fp32:
        ax.scatter([fp32], [100 * baseline], marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                   label=f"fp32 ({100 * baseline:.2f}%)")
    peers = [p for p in meta.get("peer") or [] if axis.peer_key and p.get(axis.peer_key)]
    for j, peer in enumerate(peers):
        ax.scatter([peer[axis.peer_key]], [100 * peer["accuracy"]], marker="x", s=60, color="grey", zorder=3,
                   label="peer tools" if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel(axis.label)
    ax.set_ylabel(ACCURACY)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    title = f"{meta.get('model', '?')} on {meta.get('data', '?')}: accuracy vs {axis.label}"
    ax.set_title(title, fontsize=10)
    caption = (f"Accuracy against {axis.label} (log scale): one marker per run, each strategy's Pareto front as a "
               "step line" + (", the fp32 model as a star" if fp32 and baseline is not None else "")
               + (", peer tools as grey crosses" if peers else "") + ".")
    return render(axis.name, fig, title, axis.label, ACCURACY, caption)


def _finish(ax: Any, title: str, xlabel: str, ylabel: str, legend: str) -> None:
    """Labels, title, grid and legend of a progress curve, whose x axis counts whole steps."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc=legend)


def reward_figure(runs: list[dict[str, Any]]) -> Rendered | None:
    """AJPQ's reward per episode, one line per run with its running best; None when no run kept its rewards."""
    found = [(r["name"], r["result"]["info"]["rewards"]) for r in done_runs(runs)
             if (r["result"].get("info") or {}).get("rewards")]
    if not found:
        return None
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, rewards) in enumerate(found):
        episodes = range(1, len(rewards) + 1)
        ax.plot(episodes, rewards, color=f"C{i % 10}", lw=0.7, alpha=0.45, label=name)
        ax.plot(episodes, list(accumulate(rewards, max)), color=f"C{i % 10}", lw=1.8, label=f"{name}: best so far")
    xlabel, ylabel, title = "episode", "reward", "AJPQ search: reward per episode"
    _finish(ax, title, xlabel, ylabel, legend="lower right")
    caption = "AJPQ: the proxy reward of every episode (thin) and the best so far (thick), per run."
    return render("ajpq_rewards", fig, title, xlabel, ylabel, caption)


def sbs_figure(runs: list[dict[str, Any]]) -> Rendered | None:
    """SBS's policy cost over the budget limit per epoch, one line per run; None when no run kept its history."""
    found = [(r["name"], r["result"]["info"]["sbs_history"]) for r in done_runs(runs)
             if (r["result"].get("info") or {}).get("sbs_history")]
    if not found:
        return None
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, history) in enumerate(found):
        ax.plot([h["epoch"] for h in history], [h["cost"] / h["limit"] for h in history], marker="o", ms=4,
                color=f"C{i % 10}", label=name)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="budget (cost = limit)")
    xlabel, ylabel, title = "epoch", "cost / limit", "SBS search: policy cost over the budget"
    _finish(ax, title, xlabel, ylabel, legend="upper right")
    caption = "SBS: the cost of the policy its gates describe after each epoch, over the budget's limit."
    return render("sbs_cost", fig, title, xlabel, ylabel, caption)


def all_figures(meta: dict[str, Any], runs: list[dict[str, Any]],
                run: str | None = None) -> tuple[list[Rendered], list[str]]:
    """Every figure the runs have data for, and a note for each one left out (and why)."""
    figures: list[Rendered] = []
    notes: list[str] = []
    for axis in AXES:
        drawn = pareto_figure(meta, runs, axis)
        if drawn:
            figures.append(drawn)
        elif axis.fp32_key:  # no latency front is the normal case; say nothing then
            notes.append(f"No accuracy vs {axis.label} figure: no finished run reports its {axis.label}.")
    chosen = choose_run(runs, run)
    if chosen:
        figures.append(layer_figure(chosen))
    else:
        notes.append("No per-layer map: no finished run's result.json lists its layers (written by an older "
                     "zerobit; rerun compress to get them).")
    for strategy, key, draw in (("ajpq", "rewards", reward_figure), ("sbs", "sbs_history", sbs_figure)):
        drawn = draw(runs)
        if drawn:
            figures.append(drawn)
        lacking = [r["name"] for r in done_runs(runs) if r["strategy"] == strategy
                   and not (r["result"].get("info") or {}).get(key)]
        if lacking:
            notes.append(f"No search curve for {', '.join(lacking)}: its result.json holds no info[\"{key}\"] "
                         "(written by an older zerobit).")
    return figures, notes
