"""Which Hugging Face architectures compress end to end: compress → save → load → the same outputs.

Each architecture is built from a small `transformers` config with random weights (offline; the structure is the
real model code), given a few random batches (token ids, or 3×32×32 images), compressed to 1/4 of its fp32 bytes
with a 0.5-epoch fine-tune, written, loaded into a fresh model and run on the example again. A row records what
zerobit made of the model (groups, prunable groups, head groups), the file against the budget, the largest
output difference after loading and, for a failure, the error. Every case runs in its own process with a time
limit (a hang is a failure too).

    python bench/architectures.py [--strategies uniform,sbs] [--only gpt2,llama] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "architectures.json"
H, LAYERS, HEADS, VOCAB = 32, 2, 4, 60


def builders() -> dict:
    """Architecture name → (zero-argument builder, input kind: "tokens" | "lm" | "images")."""
    import transformers as T

    text = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=64, max_position_embeddings=32, num_labels=3)
    decoder = dict(text, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    image = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=H, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=64, num_labels=3)
    return {
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**text)), "tokens"),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, num_labels=3)), "tokens"),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            **(text | {"max_position_embeddings": 40}), pad_token_id=1)), "tokens"),
        "albert": (lambda: T.AlbertForSequenceClassification(T.AlbertConfig(**text, embedding_size=16)), "tokens"),
        "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**text, embedding_size=H)), "tokens"),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                                                        n_positions=32, bos_token_id=0, eos_token_id=0)), "lm"),
        "opt": (lambda: T.OPTForSequenceClassification(T.OPTConfig(
            vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=64,
            max_position_embeddings=40, word_embed_proj_dim=H, num_labels=3, pad_token_id=1)), "tokens"),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**decoder)), "lm"),
        "llama-mha": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**dict(decoder, num_key_value_heads=HEADS))), "lm"),
        "llama-mqa": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**dict(decoder, num_key_value_heads=1))), "lm"),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**decoder)), "lm"),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**dict(decoder, num_key_value_heads=HEADS))), "lm"),
        "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**dict(decoder, num_key_value_heads=HEADS))),
                     "lm"),
        "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                                                        rotary_dim=4, n_positions=32, bos_token_id=0,
                                                        eos_token_id=0)), "lm"),
        "gpt-neo": (lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=H, num_layers=LAYERS, attention_types=[[["global", "local"], 1]],
            num_heads=HEADS, intermediate_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)),
            "lm"),
        "gpt-neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**decoder)), "lm"),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**decoder)), "lm"),
        "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**decoder, head_dim=H // HEADS)), "lm"),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**decoder, head_dim=H // HEADS)), "lm"),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**image)), "images"),
        "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**image)), "images"),
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4, num_labels=3)), "images"),
        "mobilevit": (lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=32, num_channels=3, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 80],
            num_labels=3)), "images"),
    }


def _batches(kind: str, n: int, size: int, seed: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "images":
        return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 3, (size,), generator=g))
                for _ in range(n)]
    out = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(3, VOCAB, (size, 12), generator=g),
                 "attention_mask": torch.ones(size, 12, dtype=torch.long)}
        if kind == "tokens":
            batch["labels"] = torch.randint(0, 3, (size,), generator=g)
        out.append(batch)
    return out


def run_case(name: str, strategy: str) -> dict:
    """One architecture × strategy, in this process."""
    import tempfile
    import warnings

    import torch

    import zerobit as zb

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    build, kind = builders()[name]
    train, val = _batches(kind, 4, 8, 1), _batches(kind, 2, 16, 2)
    example = train[0][0][:2] if kind == "images" else {k: v[:2] for k, v in train[0].items() if k != "labels"}
    torch.manual_seed(0)
    start = time.perf_counter()
    r = zb.compress(build().eval(), example, zb.Size(fraction=1 / 4), strategy, train_data=train, eval_data=val,
                    task="distillation" if kind == "lm" else "classification",
                    finetune_config=zb.FinetuneConfig(epochs=0.5), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.zbit"
        written = r.save(path)
        torch.manual_seed(0)
        loaded = zb.load(path, build().eval(), example_inputs=example)
        with torch.no_grad():
            outs = [m(**example) if isinstance(example, dict) else m(example) for m in (loaded, r.model.eval())]
        diff = float((outs[0].logits - outs[1].logits).abs().max())
        onnx = _onnx_check(path, build, example, val)
    groups = r.graph.groups.values()
    return {"file_bytes": written, "on_disk_equal": written == r.file_bytes, "fp32_bytes": r.graph.fp32_bytes,
            "budget_limit": r.budget.limit(r.graph), "max_abs_diff_after_load": diff, "groups": len(groups),
            "prunable_groups": sum(g.prunable for g in groups), "head_groups": sum(g.span > 1 for g in groups),
            "seconds": time.perf_counter() - start, **onnx}


def _onnx_check(path: Path, build, example, data) -> dict:
    """The .zbit exported to ONNX (mode exact) and run in onnxruntime against the loaded model on `data`."""
    import zerobit as zb
    from zerobit.export.onnx import export_onnx, parity

    try:
        report = export_onnx(path, path.with_suffix(".onnx"), model=build().eval(), example_inputs=example,
                             mode="exact")
        found = parity(path.with_suffix(".onnx"), zb.load(path, build().eval(), example_inputs=example), data)
    except Exception as exc:  # recorded, not raised: the case's compress → save → load already passed
        return {"onnx_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"onnx_bytes": report.onnx_bytes, "onnx_agreement": found["agreement"],
            "onnx_max_abs_diff": found["max_abs_diff"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default="uniform,sbs")
    ap.add_argument("--only", default="", help="comma-separated architectures (default: all)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    ap.add_argument("--case", nargs=2, metavar=("ARCH", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # the child process of one case
        print(json.dumps(run_case(*args.case)))
        return 0
    import transformers

    names = args.only.split(",") if args.only else list(builders())
    rows = []
    for strategy in args.strategies.split(","):
        for name in names:
            row = {"architecture": name, "strategy": strategy, "transformers": transformers.__version__}
            try:
                done = subprocess.run([sys.executable, __file__, "--case", name, strategy], capture_output=True,
                                      text=True, timeout=args.timeout, cwd=ROOT)
                if done.returncode == 0:
                    row |= {"ok": True} | json.loads(done.stdout.strip().splitlines()[-1])
                else:
                    row |= {"ok": False, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row |= {"ok": False, "error": f"no result within {args.timeout} s"}
            rows.append(row)
            print(f"{name:>10} {strategy:>8}  " + (f"ok  {row['file_bytes']:>7,} B of {row['budget_limit']:>7,.0f}, "
                                                   f"Δ after load {row['max_abs_diff_after_load']:.1e}, "
                                                   f"{row['prunable_groups']}/{row['groups']} groups prunable, "
                                                   + (f"ONNX {100 * row['onnx_agreement']:.1f}% equal, Δ "
                                                      f"{row['onnx_max_abs_diff']:.1e}" if "onnx_bytes" in row
                                                      else f"ONNX {row.get('onnx_error')}")
                                                   if row["ok"] else f"FAILED: {row['error']}"), flush=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    from bench.report import write_benchmarks_md

    write_benchmarks_md(None, ROOT / "BENCHMARKS.md")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
