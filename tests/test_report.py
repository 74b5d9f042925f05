"""The HTML/PNG report of compression runs, on result.json files written by hand with measured-style numbers
(bench/results/compression.json rows of resnet20 on Fashion-MNIST): this tests the report, not compression."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from zerobit.report import read_runs, write_report
from zerobit.report.figures import pareto_front
from zerobit.report.layers import choose_run

FP32 = {"fp32_bytes": 1106024, "fp32_bops": 31766478848, "fp32_macs": 31021952, "baseline_accuracy": 0.9331}
NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1", "fc"]
CHANNELS = [16, 16, 16, 32, 32, 64, 10]


def layers(kept: list[int], wbits: list[float], abits: list[int]) -> list[dict]:
    return [{"layer": n, "group": "conv1" if n.endswith("conv2") else n, "kind": "linear" if n == "fc" else "conv",
             "channels": c, "kept": k, "weight_bits": w, "act_bits": a}
            for n, c, k, w, a in zip(NAMES, CHANNELS, kept, wbits, abits, strict=True)]


def result(strategy: str, budget: str, file_bytes: int, accuracy: float, bops: float, **extra) -> dict:
    row = FP32 | {"strategy": strategy, "budget_text": budget, "budget": f"Size({budget})", "file_bytes": file_bytes,
                  "accuracy": accuracy, "bops": bops, "macs": int(bops / 20), "ratio": FP32["fp32_bytes"] / file_bytes,
                  "budget_unit": "bytes", "metric": "classification", "seconds": 162.1, "model": "resnet20",
                  "device": "cpu", "finetune_epochs": 0.25, "data": "fashion-mnist", "task": "classification",
                  "info": {}, "layers": layers([13, 16, 13, 20, 13, 40, 10], [3, 3, 3, 2, 3, 2, 4], [8] * 7)}
    return row | extra


RUNS = {  # name: (status, result or error)
    "uniform@1_16": ("done", result("uniform", "1/16", 68870, 0.9173, 486162408)),
    "uniform@1_32": ("done", result("uniform", "1/32", 34262, 0.8885, 231751792)),
    "opq@1_32": ("done", result("opq", "1/32", 34101, 0.9012, 301233920)),
    "ajpq@1_32": ("done", result("ajpq", "1/32", 34530, 0.8812, 521648904,
                                 info={"episodes": 6, "rewards": [-9.1, -7.4, -8.0, -5.9, -6.3, -5.2]})),
    "sbs@1_32": ("done", result("sbs", "1/32", 33987, 0.9055, 260112384, layers=layers(
        [9, 16, 9, 28, 9, 51, 10], [4, 2, 4, 2.5, 4, 2, 8], [32, 8, 4, 4, 8, 4, 8]), info={"sbs_history": [
            {"epoch": 1, "loss": 0.61, "cost": 52011, "limit": 34563}, {"epoch": 2, "loss": 0.44, "cost": 36120,
                                                                         "limit": 34563}]})),
    "uniform@1_64": ("done", {k: v for k, v in result("uniform", "1/64", 16668, 0.7676, 102112016).items()
                              if k not in ("layers", "info")}),  # an older result.json: no layers, no info
    "admm@1_64": ("failed", "RuntimeError: CUDA out of memory"),
    "opq@1_64": ("left", None),
}
PEER = [{"label": "torch-pruning + ORT int8", "accuracy": 0.9138, "file_bytes": 68390},
        {"label": "torch-pruning + ORT int8", "accuracy": 0.8999, "file_bytes": 32656, "bops": 4.1e8}]


def write_sweep(folder: Path, runs: dict = RUNS) -> Path:
    entries = []
    for name, (status, payload) in runs.items():
        strategy, budget = name.split("@")
        entry = {"name": name, "strategy": strategy, "budget": budget.replace("_", "/"), "dir": f"runs/{name}",
                 "status": status}
        if status == "done":
            (folder / entry["dir"]).mkdir(parents=True)
            (folder / entry["dir"] / "result.json").write_text(json.dumps(payload))
        elif status == "failed":
            entry["error"] = payload
        entries.append(entry)
    sweep = {"model": "resnet20", "data": "fashion-mnist", "finetune_epochs": 0.25, "seed": 0,
             "budgets": ["1/16", "1/32", "1/64"], "strategies": ["uniform", "opq", "ajpq", "sbs", "admm"],
             "baseline_accuracy": 0.9331, "fp32_bytes": None, "fp32_bops": None, "mode": "local",
             "wall_seconds": 5321.0, "device": "cpu", "runs": entries, "peer": PEER}
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return folder


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword → text), read with the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return out


class Page(HTMLParser):
    """The images, table rows and text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.rows: list[dict] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "tr" and dict(attrs).get("data-run"):
            self.rows.append(dict(attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(34262, 88.85), (34101, 90.12), (34530, 88.12), (16668, 76.76), (68870, 91.73), (68870, 90.0),
              (16668, 76.76), (70000, 91.73)]
    assert pareto_front(points) == [(16668, 76.76), (34101, 90.12), (68870, 91.73)]
    assert pareto_front([]) == []


def test_sweep_report_draws_every_figure_with_its_axis_labels(tmp_path):
    folder = write_sweep(tmp_path)
    page_path = write_report(folder)
    assert page_path == folder / "report.html"
    expected = {"pareto_bytes": ("file bytes", "accuracy (%)"), "pareto_bops": ("BOPs", "accuracy (%)"),
                "layers": ("layer", "kept channels (%)"), "ajpq_rewards": ("episode", "reward"),
                "sbs_cost": ("epoch", "cost / limit")}
    assert {p.stem for p in (folder / "figures").glob("*.png")} == set(expected)  # no latency: none measured
    for name, (x, y) in expected.items():
        meta = png_text((folder / "figures" / f"{name}.png").read_bytes())
        assert meta["Description"].startswith(f"x: {x}; y: {y}"), (name, meta)
    page = Page(page_path.read_text())
    assert sorted(img["data-figure"] for img in page.imgs) == sorted(expected)
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert png == (folder / "figures" / f"{img['data-figure']}.png").read_bytes()
        assert png_text(png)["Title"] in img["alt"]
    assert [r["data-run"] for r in page.rows] == list(RUNS)
    text = " ".join(page.text)
    assert "CUDA out of memory" in text and "34,101" in text and "-3.19" in text
    assert "torch-pruning + ORT int8" in text and "5,321 s" in text
    assert not re.search(r'(src|href)="(?!data:)', page_path.read_text())  # nothing loaded from outside


def test_layer_map_picks_the_tightest_budgets_best_run_or_the_named_one(tmp_path):
    _, runs = read_runs(write_sweep(tmp_path))
    # uniform@1_64 made the smallest file but lists no layers; of the rest, 1/32 holds the smallest (sbs) file
    assert choose_run(runs)["name"] == "sbs@1_32"
    assert choose_run(runs, "uniform@1_16")["name"] == "uniform@1_16"
    with pytest.raises(ValueError, match="no run is named 'nope'.*uniform@1_16"):
        choose_run(runs, "nope")
    with pytest.raises(ValueError, match="lists no layers"):
        choose_run(runs, "uniform@1_64")
    with pytest.raises(ValueError, match="status failed"):
        choose_run(runs, "admm@1_64")


def test_latency_front_appears_when_a_run_measured_latency(tmp_path):
    timed = result("opq", "latency=0.5ms", 40211, 0.9101, 301233920, info={"latency_ms": 0.472})
    folder = write_sweep(tmp_path, {"opq@lat": ("done", timed)})
    write_report(folder)
    meta = png_text((folder / "figures" / "pareto_latency.png").read_bytes())
    assert meta["Description"] == "x: latency (ms); y: accuracy (%)"
    assert "0.472" in (folder / "report.html").read_text()


def test_single_compress_folder_with_an_old_result_renders_with_notes(tmp_path):
    old = {k: v for k, v in result("uniform", "1/32", 34262, 0.8885, 231751792).items()
           if k not in ("layers", "info", "bops")}
    (tmp_path / "result.json").write_text(json.dumps(old))
    page_path = write_report(tmp_path, out=tmp_path / "page.html")
    assert page_path == tmp_path / "page.html"
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == {"pareto_bytes"}
    page = Page(page_path.read_text())
    text = " ".join(page.text)
    assert [r["data-run"] for r in page.rows] == [tmp_path.name]
    assert "No per-layer map" in text and "No accuracy vs BOPs figure" in text and "88.85" in text


def test_unreadable_folders_give_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither sweep.json .* nor result.json"):
        read_runs(tmp_path)
    (tmp_path / "sweep").mkdir()
    folder = write_sweep(tmp_path / "sweep")
    damaged = folder / "runs" / "opq@1_32" / "result.json"
    damaged.write_text('{"strategy": "opq", "file_bytes": 341')
    with pytest.raises(ValueError, match=f"{damaged}.*damaged"):
        write_report(folder)
    damaged.write_text(json.dumps({"strategy": "opq"}))
    with pytest.raises(ValueError, match=f"{damaged} lacks file_bytes, accuracy"):
        read_runs(folder)
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match=str(damaged)):
        read_runs(folder)
    (folder / "sweep.json").write_text("[]")
    with pytest.raises(ValueError, match="sweep.json is damaged"):
        read_runs(folder)


def test_layer_rows_and_compress_result_store_them():
    import torch
    from tiny_models import EXAMPLE, TINY_MODELS

    from zerobit.api import CompressResult
    from zerobit.budget import Size
    from zerobit.graph import analyse
    from zerobit.policy import GroupDecision, Policy
    from zerobit.report import layer_rows

    model = TINY_MODELS["residual"]().eval()
    graph = analyse(model, EXAMPLE)
    groups = {n: GroupDecision((0, 2, 4, 4) + (8,) * (g.channels - 4)) for n, g in graph.groups.items()}
    groups["a1.0.0"] = GroupDecision((0,) * graph.groups["a1.0.0"].channels)  # a residual branch removed whole
    policy = Policy(groups, act_bits=8, act={"fc": 32})
    rows = layer_rows(graph, policy)
    assert [r["layer"] for r in rows] == list(graph.layers)
    assert {r["layer"] for r in rows if r.get("removed")} == {"a1.0.0", "a1.1"}  # a1.1 read only that branch
    for row in rows:
        kept = [b for b in groups[row["group"]].bits if b] if not row.get("removed") else []
        assert row["kept"] == len(kept) and row["channels"] == len(groups[row["group"]].bits)
        assert row["weight_bits"] == pytest.approx(sum(kept) / len(kept) if kept else 0.0, abs=1e-4)
        assert row["act_bits"] == (32 if row["layer"] == "fc" else 8)
    assert any(r["kept"] == 0 and r["weight_bits"] == 0.0 for r in rows)
    with torch.no_grad():
        stored = CompressResult(policy, model, graph, Size(kilobytes=40), "uniform", 0.5, 0.6).to_dict()
    assert stored["layers"] == rows and json.loads(json.dumps(stored["layers"])) == rows


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def test_headless_chromium_draws_every_image(tmp_path):
    browser = next((b for p in BROWSERS if (b := shutil.which(p))), None)
    if browser is None:
        pytest.skip("no headless Chromium: apt-get install chromium-headless-shell")
    page_path = write_report(write_sweep(tmp_path))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page_path.resolve().as_uri()], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    page = Page(dom)
    assert len(page.imgs) == 5
    assert all(int(img.get("data-rendered", 0)) > 0 for img in page.imgs), [i.get("data-rendered") for i in page.imgs]
    text = " ".join(page.text) + " ".join(img["alt"] for img in page.imgs)
    for label in ("file bytes", "BOPs", "accuracy (%)", "kept channels (%)", "episode", "cost / limit"):
        assert label in text
