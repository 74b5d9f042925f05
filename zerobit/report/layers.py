"""The per-layer map of one run: kept channels, weight bits and activation bits of every layer, side by side."""

from __future__ import annotations

from typing import Any

from zerobit.report.draw import Figure, Rendered, render
from zerobit.report.runs import done_runs

FLOAT = 32  # bits that mean "float" (not quantized)
MAX_TICKS = 80  # beyond this many layers, only every k-th layer is named on the x axis
_GREY = "0.6"  # bars of float layers
YLABELS = ("kept channels (%)", "weight bits (mean of kept)", "activation bits")


def choose_run(runs: list[dict[str, Any]], name: str | None = None) -> dict[str, Any] | None:
    """The run whose layers the report maps: `name`, or by default the most accurate run of the budget that
    produced the smallest file (the tightest budget's best answer). None when no finished run lists its layers.

    Example:
        >>> choose_run(runs, "sbs@1_32")["name"]  # doctest: +SKIP
        'sbs@1_32'
    """
    if name is not None:
        named = [r for r in runs if r["name"] == name]
        if not named:
            raise ValueError(f"no run is named {name!r}; the runs are: {', '.join(r['name'] for r in runs)}")
        run = named[0]
        if run["status"] != "done" or not run["result"]:
            raise ValueError(f"run {name!r} has no result (status {run['status']}); choose a finished run")
        if not run["result"].get("layers"):
            raise ValueError(f"run {name!r}'s result.json lists no layers (written by an older zerobit); "
                             "choose another run or rerun it")
        return run
    mapped = [r for r in done_runs(runs) if r["result"].get("layers")]
    if not mapped:
        return None
    smallest = min(mapped, key=lambda r: r["result"]["file_bytes"])
    same_budget = [r for r in mapped if r["budget"] == smallest["budget"]]
    return max(same_budget, key=lambda r: (r["result"]["accuracy"], -r["result"]["file_bytes"]))


def _float_slot(values: list[float]) -> float:
    """Where "float" sits on a bits axis: above the largest quantized bit-width shown."""
    quantized = [v for v in values if v < FLOAT]
    return max([8.0, *quantized]) + 4


def layer_figure(run: dict[str, Any]) -> Rendered:
    """Three panels over the layers of `run`: kept channels (% of the layer's output channels), mean weight bits
    of the kept channels, input activation bits (32 shown as "float")."""
    result = run["result"]
    rows = result["layers"]
    n = len(rows)
    x = list(range(n))
    kept = [100 * r["kept"] / r["channels"] if r["channels"] else 0.0 for r in rows]
    wbits = [float(r["weight_bits"]) for r in rows]
    abits = [float(r["act_bits"]) for r in rows]
    fig = Figure(figsize=(max(8.0, min(30.0, 0.3 * n + 2)), 7.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].bar(x, kept, color="C0")
    axes[0].set_ylim(0, 105)
    for ax, values, color in ((axes[1], wbits, "C1"), (axes[2], abits, "C2")):
        slot = _float_slot(values)
        ax.bar(x, [slot if v >= FLOAT else v for v in values], color=[_GREY if v >= FLOAT else color for v in values])
        shown = sorted({v for v in values if v < FLOAT and v == int(v)} | {2.0, 4.0, 8.0})
        has_float = any(v >= FLOAT for v in values)
        ax.set_yticks(shown + [slot] * has_float, [f"{t:g}" for t in shown] + ["float"] * has_float)
        ax.set_ylim(0, slot + 0.5)
    for ax, label in zip(axes, YLABELS, strict=True):
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    step = max(1, -(-n // MAX_TICKS))
    axes[2].set_xticks(x[::step], [r["layer"] for r in rows][::step], rotation=90, fontsize=8 if n <= 30 else 6)
    axes[2].set_xlim(-0.6, n - 0.4)
    xlabel = "layer"
    axes[2].set_xlabel(xlabel)
    title = (f"{run['name']}: {result['strategy']} at {run['budget']}, {100 * result['accuracy']:.2f}%, "
             f"{result['file_bytes']:,} bytes")
    axes[0].set_title(title, fontsize=10)
    ylabel = ", ".join(YLABELS)
    caption = (f"What {run['name']} chose, layer by layer: the share of output channels kept, the mean bits of the "
               "kept weights (32 = float) and the bits of each layer's input activations (grey = float).")
    return render("layers", fig, title, xlabel, ylabel, caption)
