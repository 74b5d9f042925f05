"""QAT throughput: images/s of a fine-tune step of the fake-quant model vs a float step of the same pruned model.

ResNet-20 / Fashion-MNIST, the uniform policy at a size budget. Every variant runs the real training loop
(`zerobit.train.finetune`: batching, augmentation, clipping, the divergence guard) for a number of steps; the
variants take turns over several rounds so a busy machine slows them alike, and the median round counts.
Results → bench/results/qat_throughput.json and a table in BENCHMARKS.md.

    python bench/qat_throughput.py --device cpu --budget 1/32 --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compression import device_name, merge_row  # noqa: E402
from bench.report import write_benchmarks_md  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.budget import parse_budget  # noqa: E402
from zerobit.data import get_splits  # noqa: E402
from zerobit.data.loaders import Batches  # noqa: E402
from zerobit.device import resolve  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.importance import group_scores  # noqa: E402
from zerobit.quant.apply import apply_policy, inference_copy, prune_structure  # noqa: E402
from zerobit.strategies import Problem, get_strategy  # noqa: E402
from zerobit.train.calibrate import calibrate_activations  # noqa: E402
from zerobit.train.finetune import FinetuneConfig, finetune  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "qat_throughput.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="1/32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve(args.device)
    splits = get_splits("fashion-mnist")
    model = zoo.load_pretrained("resnet20").to(device).eval()
    example = zoo.example_input("resnet20").to(device)
    graph = analyse(model, example)
    problem = Problem(model, graph, parse_budget(args.budget), example, splits.train, splits.val,
                      group_scores(model, graph), progress=False)
    policy = get_strategy("uniform").search(problem).policy
    float_model = prune_structure(model, graph, policy, example)
    qat = {q: apply_policy(model, graph, policy, example) for q in ("mse", "lsq")}
    for m in qat.values():
        calibrate_activations(m, Batches(splits.train, 256, shuffle=True))
    teacher = inference_copy(model, graph)
    variants = {  # name → (student, teacher, quantizer, precision)
        "float": (float_model, None, "mse", "float32"), "qat (mse steps)": (qat["mse"], None, "mse", "float32"),
        "qat (lsq steps)": (qat["lsq"], None, "lsq", "float32"),
        "float + distillation": (float_model, teacher, "mse", "float32"),
        "qat + distillation": (qat["mse"], teacher, "mse", "float32"),
        "qat + distillation, unfolded teacher": (qat["mse"], model, "mse", "float32"),
        "qat + distillation, bfloat16 autocast": (qat["mse"], teacher, "mse", "bfloat16")}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name, (student, t, quantizer, precision) in variants.items():
            cfg = FinetuneConfig(batch_size=args.batch_size, quantizer=quantizer, precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            finetune(student, splits.train, cfg, teacher=t, progress=False, steps=args.steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    images = args.steps * args.batch_size
    rate = {name: images / statistics.median(s[1:]) for name, s in seconds.items()}
    result = {"budget": args.budget, "device": str(device), "device_name": device_name(str(device)),
              "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
              "batch_size": args.batch_size, "images_per_s": rate,
              "ratio vs float": {n: rate["float"] / r for n, r in rate.items()},
              "ratio vs float + distillation": {n: rate["float + distillation"] / r for n, r in rate.items()}}
    for name, r in rate.items():
        print(f"{name:38} {r:8.0f} img/s   {rate['float'] / r:.2f}× the float step", flush=True)
    merge_row(RESULTS, result, lambda r: (r["device"], r["budget"]))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
