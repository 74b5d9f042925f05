"""Per-layer choices of SBS runs: kept channels, weight bits and input bits of every layer.

Reads the policy.json that `bench/compression.py` wrote for each SBS run and writes bench/results/sbs_layers.json
(rendered in BENCHMARKS.md):

    python bench/sbs_layers.py runs/bench/sbs_bops_1over64 runs/bench/sbs_1over32 "runs/act48=inputs 4/8 bits" ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.policy import Policy  # noqa: E402
from zerobit.report.runs import layer_rows as report_rows  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sbs_layers.json"


def layer_rows(model_name: str, policy: Policy) -> list[dict]:
    """zerobit's per-layer rows, with "weight_bits" the sorted distinct bits of the kept channels (what
    bench/report.py's table shows) and their mean under "weight_bits_mean"."""
    graph = analyse(zoo.load_pretrained(model_name), zoo.example_input(model_name))
    rows = report_rows(graph, policy)
    for row in rows:
        row["weight_bits_mean"] = row["weight_bits"]
        row["weight_bits"] = sorted(set(policy[row["group"]].kept_bits()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="output folders of SBS runs (policy.json + result.json), each "
                    "optionally =LABEL (the strategy options that differ from the defaults)")
    args = ap.parse_args()
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for arg in args.runs:
        folder, _, label = arg.partition("=")
        run = Path(folder)
        result = json.loads((run / "result.json").read_text())
        policy = Policy.load(str(run / "policy.json"))
        key = f"{result['model']} {result['budget_text']} {result['finetune_epochs']:g} ep {label}".strip()
        stored[key] = {"model": result["model"], "budget": result["budget_text"], "epochs": result["finetune_epochs"],
                       "label": label,
                       "accuracy": result["accuracy"], "device": result.get("device", "cpu"),
                       "layers": layer_rows(result["model"], policy)}
        print(key, f"{100 * result['accuracy']:.2f}%")
    RESULTS.write_text(json.dumps(stored, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
