"""Does AJPQ's best proxy reward pick the best policy? Its leading policies, re-scored and fine-tuned for real.

Runs (or resumes) one AJPQ search, then takes the `--top` best distinct policies it found and, for each, records
the search's proxy reward, the rewards of the final proxies in FINALS, and the test accuracy after the real
recipe (apply, calibrate, fine-tune with distillation for `--epochs`). Spearman ρ of each score vs that accuracy,
and the accuracy of the policy each score would pick, go to bench/results/ajpq_rerank.json and BENCHMARKS.md.

    python bench/ajpq_rerank.py --budget 1/32 --top 6 --epochs 0.25 --option proxy.samples=500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ajpq_proxy import finetuned_accuracy, spearman  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import parse_budget, zoo  # noqa: E402
from zerobit.cli import parse_options  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.device import resolve  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.importance import group_scores  # noqa: E402
from zerobit.policy import Policy  # noqa: E402
from zerobit.strategies import Problem, ProxyConfig, get_strategy  # noqa: E402
from zerobit.strategies.proxy import proxy_reference, proxy_reward, proxy_scores  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ajpq_rerank.json"
FINALS = {"BN 20 batches, 5,000 images": ProxyConfig(recovery_batches=20, samples=5000),
          "BN 20 batches + 20 QAT steps, 5,000 images": ProxyConfig(recovery_batches=20, samples=5000,
                                                                    finetune_steps=20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="1/32")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--epochs", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="AJPQ option")
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "ajpq_rerank.state"))
    args = ap.parse_args()
    splits = get_splits("fashion-mnist")
    device = resolve(args.device)
    model, x = zoo.load_pretrained("resnet20").to(device), zoo.example_input("resnet20").to(device)
    graph = analyse(model, x)
    problem = Problem(model, graph, parse_budget(args.budget), x, splits.train, splits.val,
                      group_scores(model, graph), progress=True)
    options = parse_options(args.option) | {"rerank": args.top, "checkpoint": args.checkpoint, "seed": args.seed}
    strategy = get_strategy("ajpq", **options)
    t = time.perf_counter()
    found = strategy.search(problem)
    search_seconds = time.perf_counter() - t
    top = _top_policies(args.checkpoint)
    references = {name: proxy_reference(problem, cfg, args.seed) for name, cfg in FINALS.items()}
    rows = []
    for i, (reward, policy) in enumerate(top):
        row = {"rank": i, "search reward": reward, "bytes": problem.cost(policy)}
        for name, cfg in FINALS.items():
            scores = proxy_scores(problem, references[name], policy, cfg, args.seed)
            row[name] = proxy_reward(scores, references[name], cfg.metric)
        torch.manual_seed(args.seed)
        row["final test accuracy"] = finetuned_accuracy(problem, policy, splits, args.epochs, args.seed)
        row["picked by the search"] = policy == found.policy
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = summarize(rows, args, search_seconds)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "policies"}, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


def _top_policies(checkpoint: str) -> list[tuple[float, Policy]]:
    from safetensors import safe_open

    with safe_open(checkpoint, "pt") as f:
        state = json.loads(f.metadata()["state"])
    return [(reward, Policy.from_dict(p)) for reward, p in state["top"]]


def summarize(rows: list[dict], args: argparse.Namespace, search_seconds: float) -> dict:
    final = [r["final test accuracy"] for r in rows]
    scores = ["search reward", *FINALS]
    return {"budget": args.budget, "epochs": args.epochs, "options": args.option, "search seconds": search_seconds,
            "policies": rows,
            "spearman": {s: spearman([r[s] for r in rows], final) for s in scores},
            "accuracy of the pick": {s: final[int(np.argmax([r[s] for r in rows]))] for s in scores},
            "best accuracy": max(final), "mean accuracy": float(np.mean(final))}


if __name__ == "__main__":
    sys.exit(main())
