"""How well does AJPQ's cheap reward rank policies? Rank correlation of proxy rewards vs accuracy after fine-tuning.

Samples policies under one budget the way AJPQ's warm-up does (random actions through the budget wall), scores
each with several proxies, then fine-tunes each for real and measures test accuracy of the result.

    python bench/ajpq_proxy.py --policies 10 --budget 1/32 --epochs 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import FinetuneConfig, parse_budget, zoo  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.data.loaders import Batches  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.importance import group_scores  # noqa: E402
from zerobit.quant.apply import apply_policy  # noqa: E402
from zerobit.strategies import AJPQ, ActionSpace, Problem, ProxyConfig  # noqa: E402
from zerobit.strategies.ajpq import _Episode  # noqa: E402
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm  # noqa: E402
from zerobit.train.evaluate import accuracy  # noqa: E402
from zerobit.train.finetune import finetune  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ajpq_proxy.json"
PROXIES = {"no recovery": ProxyConfig(recovery_batches=0), "BN re-estimation, 10 batches": ProxyConfig(),
           "BN re-estimation, 40 batches": ProxyConfig(recovery_batches=40)}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sample_policies(problem: Problem, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    space = ActionSpace()
    out = []
    for _ in range(n):
        ep = _Episode(problem, space)
        for name in problem.graph.groups:
            level = int(rng.integers(0, len(space.bits)))
            ep.step(name, float(rng.uniform(0, space.max_sparsity)), level)
        out.append(ep.policy())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", type=int, default=10)
    ap.add_argument("--budget", default="1/32")
    ap.add_argument("--epochs", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    splits = get_splits("fashion-mnist")
    model = zoo.load_pretrained("resnet20")
    x = zoo.example_input("resnet20")
    graph = analyse(model, x)
    problem = Problem(model, graph, parse_budget(args.budget), x, splits.train, splits.val,
                      group_scores(model, graph), progress=False)
    policies = sample_policies(problem, args.policies, args.seed)
    rows = []
    proxies = {name: AJPQ(proxy=cfg) for name, cfg in PROXIES.items()}
    proxy_models = {name: a._proxy_model(problem) for name, a in proxies.items()}
    for i, policy in enumerate(policies):
        row = {"policy": i, "bytes": problem.cost(policy)}
        for name, a in proxies.items():
            t = time.perf_counter()
            pm, ref = proxy_models[name]
            row[name] = a._reward(problem, pm, policy, ref, i)
            row[name + " seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        q = apply_policy(model, graph, policy, x)
        calib = Batches(splits.train, 256, shuffle=True, seed=args.seed)
        recalibrate_batchnorm(q, calib)
        calibrate_activations(q, calib)
        finetune(q, splits.train, FinetuneConfig(epochs=args.epochs, seed=args.seed), teacher=model, progress=False)
        row["final test accuracy"] = accuracy(q, splits.test)
        row["fine-tune seconds"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"budget": args.budget, "epochs": args.epochs, "policies": rows,
               "spearman": {name: spearman([r[name] for r in rows], [r["final test accuracy"] for r in rows])
                            for name in PROXIES}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["spearman"], indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
