"""How well does AJPQ's cheap reward rank policies? Rank correlation of proxy rewards vs accuracy after fine-tuning.

Samples policies under one budget the way AJPQ's warm-up does (random actions through the budget wall), scores
each with several proxies, then fine-tunes each for real and measures test accuracy of the result.

    python bench/ajpq_proxy.py --policies 10 --budget 1/32 --epochs 0.5
    python bench/ajpq_proxy.py --rescore     # score the stored policies with PROXIES again (no fine-tuning)
    python bench/ajpq_proxy.py --budget 1/64 --only bfloat16 --out bench/results/ajpq_proxy_1over64.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import FinetuneConfig, parse_budget, zoo  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.data.loaders import Batches  # noqa: E402
from zerobit.device import resolve  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.importance import group_scores  # noqa: E402
from zerobit.quant.apply import apply_policy  # noqa: E402
from zerobit.strategies import ActionSpace, Problem, ProxyConfig  # noqa: E402
from zerobit.strategies.ajpq import _Episode  # noqa: E402
from zerobit.strategies.proxy import proxy_reference, proxy_scores  # noqa: E402
from zerobit.train.calibrate import calibrate_activations, recalibrate_batchnorm  # noqa: E402
from zerobit.train.evaluate import accuracy  # noqa: E402
from zerobit.train.finetune import finetune  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ajpq_proxy.json"
THOUSAND = 1000  # images scored (the default), unless the name says otherwise
BASE = ProxyConfig(samples=THOUSAND, precision="float32")  # float32 unless the name says bfloat16
BF16 = ", bfloat16"
PROXIES = {"no recovery": replace(BASE, recovery_batches=0),
           "BN re-estimation (10 batches)": BASE,
           "BN re-estimation (5 batches)": replace(BASE, recovery_batches=5),
           "BN re-estimation (10 batches), 500 images scored": replace(BASE, samples=500),
           "BN + 20 QAT steps": replace(BASE, finetune_steps=20),
           "BN + 20 QAT steps of 32 images": replace(BASE, finetune_steps=20, batch_size=32),
           "BN + 8 QAT steps at lr 0.05": replace(BASE, finetune_steps=8, lr=0.05),
           "BN + 20 QAT steps of 32, 500 images scored": replace(BASE, finetune_steps=20, batch_size=32, samples=500),
           "BN re-estimation (6 batches), 500 images scored": replace(BASE, recovery_batches=6, samples=500),
           "BN re-estimation (4 batches of 256), 500 images scored": replace(BASE, recovery_batches=4, batch_size=256,
                                                                             samples=500),
           "BN re-estimation (10 batches of 64), 500 images scored": replace(BASE, batch_size=64, samples=500),
           "BN re-estimation (10 batches)" + BF16: replace(BASE, precision="bfloat16"),
           "BN + 20 QAT steps" + BF16: replace(BASE, finetune_steps=20, precision="bfloat16"),
           "BN + 5 QAT steps" + BF16: replace(BASE, finetune_steps=5, precision="bfloat16"),
           "BN + 10 QAT steps" + BF16: replace(BASE, finetune_steps=10, precision="bfloat16")}


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks from 0, ties sharing their average rank."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    for value in np.unique(v):
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (0 when either side is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
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


def score(problem: Problem, references: dict, policy, seed: int) -> dict:
    """Every chosen proxy's scores and seconds for one policy."""
    row = {}
    for name in references:
        cfg = PROXIES[name]
        t = time.perf_counter()
        scores = proxy_scores(problem, references[name], policy, cfg, seed)
        row[f"{name} seconds"] = time.perf_counter() - t
        row |= {f"{name} {metric}": value for metric, value in scores.items()}
    return row


def finetuned_accuracy(problem: Problem, policy, splits, epochs: float, seed: int) -> float:
    """Test accuracy after the real recipe: apply, calibrate, fine-tune with distillation."""
    q = apply_policy(problem.model, problem.graph, policy, problem.example_inputs)
    calib = Batches(splits.train, 256, shuffle=True, seed=seed)
    recalibrate_batchnorm(q, calib)
    calibrate_activations(q, calib)
    finetune(q, splits.train, FinetuneConfig(epochs=epochs, seed=seed), teacher=problem.model, progress=False)
    return accuracy(q, splits.test)


def summarize(rows: list[dict], budget: str, epochs: float) -> dict:
    final = [r["final test accuracy"] for r in rows]
    names = [n for n in PROXIES if all(f"{n} kl" in r for r in rows)]
    rho = {f"{n} {metric}": spearman([sign * r[f"{n} {metric}"] for r in rows], final)
           for n in names for metric, sign in (("accuracy", 1), ("kl", -1))}
    rho["bytes used"] = spearman([r["bytes"] for r in rows], final)
    seconds = {n: float(np.mean([r[f"{n} seconds"] for r in rows])) for n in names}
    twins = {n: _agreement(rows, n.removesuffix(BF16), n) for n in names if n.endswith(BF16) and n[:-len(BF16)] in names}
    return {"budget": budget, "epochs": epochs, "policies": rows, "spearman": rho, "proxy seconds": seconds,
            "bfloat16 vs float32": twins}


def _agreement(rows: list[dict], a: str, b: str) -> dict:
    """How closely two proxies' accuracies agree policy by policy."""
    x, y = [r[f"{a} accuracy"] for r in rows], [r[f"{b} accuracy"] for r in rows]
    return {"max abs difference": float(np.max(np.abs(np.subtract(x, y)))), "spearman": spearman(x, y)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", type=int, default=10)
    ap.add_argument("--budget", default="1/32")
    ap.add_argument("--epochs", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    ap.add_argument("--rescore", action="store_true", help="re-score the stored policies; keep their accuracies")
    ap.add_argument("--only", default="", help="score only the proxies whose name contains this text")
    ap.add_argument("--out", default=str(RESULTS), help="results file (read back by --rescore)")
    args = ap.parse_args()
    out = Path(args.out)
    stored = json.loads(out.read_text()) if args.rescore else None
    if stored:
        args.budget, args.epochs, args.policies = stored["budget"], stored["epochs"], len(stored["policies"])
    splits = get_splits("fashion-mnist")
    model = zoo.load_pretrained("resnet20").to(resolve(args.device))
    x = zoo.example_input("resnet20").to(resolve(args.device))
    graph = analyse(model, x)
    problem = Problem(model, graph, parse_budget(args.budget), x, splits.train, splits.val,
                      group_scores(model, graph), progress=False)
    references = {name: proxy_reference(problem, cfg, args.seed) for name, cfg in PROXIES.items() if args.only in name}
    rows = []
    for i, policy in enumerate(sample_policies(problem, args.policies, args.seed)):
        row = {"policy": i, "bytes": problem.cost(policy)} | score(problem, references, policy, args.seed + i)
        if stored:
            old = stored["policies"][i]
            if old["bytes"] != row["bytes"]:
                raise RuntimeError(f"policy {i} is not the stored one ({row['bytes']} vs {old['bytes']} B)")
            row = old | row
        else:
            t = time.perf_counter()
            row["final test accuracy"] = finetuned_accuracy(problem, policy, splits, args.epochs, args.seed)
            row["fine-tune seconds"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = summarize(rows, args.budget, args.epochs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["spearman"], indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
