"""Tied weights stored once: the .zbit bytes of Hugging Face language models (configs of their real sizes, random
weights: sizes do not depend on the values) whose output layer shares the token embedding's weight, traced tied
(one tensor, `zerobit.graph.tied`) and untied (as .zbit files before version 4 stored them), under the same uniform
policies without pruning. Results: bench/results/tied.json and a table in BENCHMARKS.md.

    python bench/tied.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_benchmarks_md  # noqa: E402
from zerobit.export.zbit import estimate_bytes  # noqa: E402
from zerobit.graph import analyse  # noqa: E402
from zerobit.policy import GroupDecision, Policy  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "tied.json"


def models() -> dict:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    return {"gpt2 (124 M, lm_head = wte)": (lambda: GPT2LMHeadModel(GPT2Config()), 50257),
            "bert-base MLM (110 M, decoder = word embeddings)": (lambda: BertForMaskedLM(BertConfig()), 30522)}


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name, (build, vocab) in models().items():
        model = build().eval()
        example = {"input_ids": torch.randint(0, vocab, (1, 16))}
        for tied in (True, False):
            t0 = time.perf_counter()
            graph = analyse(model, example, tied=tied)
            seconds = time.perf_counter() - t0
            for bits in (8, 4):
                policy = Policy({n: GroupDecision((bits,) * g.channels) for n, g in graph.groups.items()}, 8)
                rows.append({"model": name, "tied": tied, "bits": bits, "fp32_bytes": graph.fp32_bytes,
                             "zbit_bytes": estimate_bytes(graph, policy), "analyse_s": seconds})
                print(f"{name:>48}  {'tied' if tied else 'untied':>6}  {bits} bits  {rows[-1]['zbit_bytes']:>13,} B",
                      flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
