"""One self-contained HTML page: settings, every figure inlined as a base64 PNG, and every number of every run."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from zerobit.report.draw import Rendered
from zerobit.report.runs import latency_ms

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.settings { color: #555; } .notes li { color: #8a5a00; }
figure { margin: 18px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 12.5px; } th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; }
th { background: #f4f4f4; text-align: left; position: sticky; top: 0; } td.n { text-align: right; }
tr.failed td { color: #a00; } tr.left td { color: #888; }
"""
# after load, each image records its decoded width: a headless browser's dumped DOM then shows it was drawn
SCRIPT = ("window.addEventListener('load', function () { for (const img of document.images) "
          "{ img.dataset.rendered = String(img.naturalWidth); } });")


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _settings(meta: dict[str, Any]) -> str:
    wall = meta.get("wall_seconds")
    parts = [("model", meta.get("model")), ("data", meta.get("data")),
             ("fine-tune epochs", _num(meta.get("finetune_epochs"), "g")), ("seed", meta.get("seed")),
             ("device", meta.get("device")), ("mode", meta.get("mode")),
             ("wall time", None if wall is None else f"{wall:,.0f} s ({wall / 3600:.2f} h)")]
    return " · ".join(f"{escape(k)}: <b>{escape(str(v))}</b>" for k, v in parts if v not in (None, ""))


def _figure(fig: Rendered) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    alt = f"{fig.title} (x: {fig.xlabel}; y: {fig.ylabel})"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}" data-figure="{escape(fig.name)}">'
            f"<figcaption>{escape(fig.caption)} <i>x: {escape(fig.xlabel)}; y: {escape(fig.ylabel)}.</i> "
            f"(figures/{escape(fig.name)}.png)</figcaption></figure>")


COLUMNS = ("run", "strategy", "budget", "status", "accuracy %", "Δ vs fp32 (pp)", "file bytes", "ratio", "BOPs",
           "MACs", "latency ms", "seconds", "device", "epochs", "error")
NUMERIC = {"accuracy %", "Δ vs fp32 (pp)", "file bytes", "ratio", "BOPs", "MACs", "latency ms", "seconds", "epochs"}


def _cells(run: dict[str, Any], meta: dict[str, Any]) -> dict[str, str]:
    r = run["result"] or {}
    acc = r.get("accuracy")
    base = r.get("baseline_accuracy", meta.get("baseline_accuracy"))
    return {"run": run["name"], "strategy": run["strategy"], "budget": run["budget"], "status": run["status"],
            "accuracy %": _num(None if acc is None else 100 * acc, ".2f"),
            "Δ vs fp32 (pp)": _num(None if acc is None or base is None else 100 * (acc - base), "+.2f"),
            "file bytes": _num(r.get("file_bytes"), ",d"), "ratio": _num(r.get("ratio"), ".1f"),
            "BOPs": _num(r.get("bops"), ",.0f"), "MACs": _num(r.get("macs"), ",.0f"),
            "latency ms": _num(latency_ms(r) if r else None, ".3f"), "seconds": _num(r.get("seconds"), ",.1f"),
            "device": str(r.get("device", "")), "epochs": _num(r.get("finetune_epochs"), "g"),
            "error": run.get("error") or ""}


def _table(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    rows = [_cells(run, meta) for run in runs]
    columns = [c for c in COLUMNS if c != "latency ms" or any(row[c] for row in rows)]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for run, row in zip(runs, rows, strict=True):
        tds = "".join(f'<td{" class=n" if c in NUMERIC else ""}>{escape(row[c])}</td>' for c in columns)
        body.append(f'<tr class="{escape(run["status"])}" data-run="{escape(run["name"])}">{tds}</tr>')
    return f'<table id="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _peer_table(meta: dict[str, Any]) -> str:
    peers = meta.get("peer") or []
    if not peers:
        return ""
    rows = "".join(f"<tr><td>{escape(str(p.get('label', '?')))}</td><td class=n>{100 * p['accuracy']:.2f}</td>"
                   f"<td class=n>{_num(p.get('file_bytes'), ',d')}</td><td class=n>{_num(p.get('bops'), ',.0f')}</td>"
                   "</tr>" for p in peers)
    return ("<h2>Peer tools</h2><table id=\"peers\"><thead><tr><th>peer</th><th>accuracy %</th><th>file bytes</th>"
            f"<th>BOPs</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(meta: dict[str, Any], runs: list[dict[str, Any]], figures: list[Rendered], notes: list[str]) -> str:
    """The whole page as one string: it loads nothing from outside (figures are data: URIs, style inline)."""
    title = f"zerobit report: {meta.get('model', '?')} on {meta.get('data', '?')}"
    base = meta.get("baseline_accuracy")
    done = sum(r["status"] == "done" for r in runs)
    lines = [f"{len(runs)} run{'s' * (len(runs) != 1)}, {done} finished"]
    if base is not None:
        lines.append(f"fp32 accuracy {100 * base:.2f}%")
    if meta.get("fp32_bytes"):
        lines.append(f"fp32 file {meta['fp32_bytes']:,} bytes")
    notes_html = ("<ul class=notes>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>") if notes else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>", f'<p class="settings">{_settings(meta)}</p>',
        f"<p>{escape('; '.join(lines))}.</p>", notes_html, "<h2>Figures</h2>",
        *(_figure(f) for f in figures), "<h2>Every run</h2>", _table(meta, runs), _peer_table(meta),
        f"<script>{SCRIPT}</script>", "</body></html>", ""])
