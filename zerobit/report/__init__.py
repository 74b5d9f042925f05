"""Reports of compression runs: one self-contained HTML page plus the same figures as PNG files.

matplotlib is needed only to draw (it is imported when `write_report` runs), so `layer_rows` and `read_runs`
work without it.
"""

from __future__ import annotations

from pathlib import Path

from zerobit.report.runs import layer_rows, read_runs

__all__ = ["layer_rows", "read_runs", "write_report"]


def write_report(folder: str | Path, run: str | None = None, out: str | Path | None = None) -> Path:
    """Write `out` (default FOLDER/report.html) and FOLDER/figures/NAME.png for a sweep or compress folder.

    Args:
        folder: a sweep folder (sweep.json + one result.json per finished run) or a compress output folder.
        run: the run whose layers the per-layer map shows (default: the most accurate run of the budget that
            produced the smallest file).
        out: where to write the HTML page.

    Returns:
        The path of the HTML page.

    Example:
        >>> write_report("runs/sweep")  # doctest: +SKIP
        PosixPath('runs/sweep/report.html')
    """
    from zerobit.report.figures import NAMES, all_figures
    from zerobit.report.html import render_html

    folder = Path(folder)
    meta, runs = read_runs(folder)
    figures, notes = all_figures(meta, runs, run)
    (folder / "figures").mkdir(exist_ok=True)
    for name in NAMES:  # a figure an earlier report drew but this one cannot must not linger
        (folder / "figures" / f"{name}.png").unlink(missing_ok=True)
    for fig in figures:
        (folder / "figures" / f"{fig.name}.png").write_bytes(fig.png)
    path = Path(out) if out is not None else folder / "report.html"
    path.write_text(render_html(meta, runs, figures, notes), encoding="utf-8")
    return path
