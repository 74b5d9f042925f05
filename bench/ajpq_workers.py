"""AJPQ with K parallel scorers: episodes per second for K = 1 (here) and K = 2, 4, … (Ray actors).

The agent proposes K policies, K Ray actors (one CPU each, on a local Ray instance) score them, then it learns
from all K. K = 1 is the serial search, in this process with every core. Writes bench/results/ajpq_workers.json
and re-renders BENCHMARKS.md:

    python bench/ajpq_workers.py --workers 1,2 --episodes 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.budget import parse_budget  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.importance import group_scores  # noqa: E402
from zerobit.strategies import AJPQ, Problem  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ajpq_workers.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--budget", default="1/32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    splits = get_splits("fashion-mnist")
    model = zoo.load_pretrained("resnet20")
    x = zoo.example_input("resnet20")
    graph = analyse(model, x)
    problem = Problem(model, graph, parse_budget(args.budget), x, splits.train, splits.val,
                      group_scores(model, graph), progress=False)
    rows = []
    if any(int(w) > 1 for w in args.workers.split(",")):
        from zerobit.parallel import connect

        connect(None, os.cpu_count())  # the Ray instance itself is not timed; its actors are
    for k in (int(w) for w in args.workers.split(",")):
        strategy = AJPQ(episodes=args.episodes, warmup=args.episodes // 4, rerank=0, workers=k, seed=args.seed)
        start = time.perf_counter()
        found = strategy.search(problem)
        seconds = time.perf_counter() - start
        rewards = found.info["rewards"]
        rows.append({"workers": k, "episodes": len(rewards), "seconds": seconds,
                     "episodes_per_s": len(rewards) / seconds, "best_reward": max(rewards),
                     "mean_last_quarter": sum(rewards[-len(rewards) // 4:]) / (len(rewards) // 4),
                     "cost": problem.cost(found.policy), "limit": problem.limit})
        print(rows[-1])
    record = {"model": "resnet20", "budget": args.budget, "seed": args.seed, "episodes": args.episodes,
              "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or 'x86_64'})", "rows": rows,
              "note": "seconds: the whole search, with its proxy reference and, for K > 1, starting the K actors "
                      "and sending them the problem (Ray itself was started before)"}
    RESULTS.write_text(json.dumps(record, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
