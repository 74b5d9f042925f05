"""Drawing without global state: matplotlib Figures on the Agg canvas (never pyplot), saved as PNG bytes whose
text metadata holds the title and the axis labels ("Title"; "Description" = "x: …; y: …")."""

from __future__ import annotations

import io
from dataclasses import dataclass

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError as exc:  # optional: the rest of zerobit runs without it
    raise ImportError("the report draws with matplotlib: pip install 'matplotlib>=3.7'") from exc

__all__ = ["DPI", "Figure", "MaxNLocator", "Rendered", "render"]

DPI = 110


@dataclass(frozen=True)
class Rendered:
    """One drawn figure: its file name (without .png), title, axis labels, caption and PNG bytes."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    caption: str
    png: bytes


def render(name: str, fig: Figure, title: str, xlabel: str, ylabel: str, caption: str) -> Rendered:
    """Draw `fig` on an Agg canvas into PNG bytes carrying `title` and the axis labels as text metadata."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Title": title, "Description": f"x: {xlabel}; y: {ylabel}"})
    return Rendered(name, title, xlabel, ylabel, caption, buf.getvalue())
