"""Compress a Hugging Face BERT with zerobit: DataLoaders of dict batches, heads removed, embeddings quantized.

The model is built from a `transformers` config with random weights, so this runs offline in about a minute and
shows the API shape; with `BertForSequenceClassification.from_pretrained(...)` and a tokenized dataset the code
is the same. The labels here are a learnable toy rule (does the sequence hold more even token ids than odd?), so
the accuracy numbers mean something: the model is first trained on it for a few seconds.

    python examples/text_bert.py [--budget 1/8] [--strategy uniform] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset

import zerobit as zb
from zerobit.train.loop import LoopSpec, fit

VOCAB, LENGTH = 200, 24


class EvenTokens(Dataset):
    """Random token sequences labelled 1 when they hold more even than odd token ids."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        self.labels = ((self.ids % 2 == 0).sum(1) > LENGTH // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


def build(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=LENGTH, num_labels=2)
    return BertForSequenceClassification(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="1/8")
    ap.add_argument("--strategy", default="uniform")
    ap.add_argument("--epochs", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train = DataLoader(EvenTokens(4096, 0), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(EvenTokens(512, 1), batch_size=128)
    test = DataLoader(EvenTokens(1024, 2), batch_size=128)

    model = build()  # a stand-in for from_pretrained: trained briefly on the toy task
    task = zb.Classification()
    fit(model, train, LoopSpec(steps=600, lr=1e-3, optimizer="adamw", warmup_steps=50),
        lambda m, b: task.loss(m, b), desc="pre-train")
    model.eval()
    print(f"original: {task.metric(model, test):.1%} test accuracy")

    example = {k: v[:1] for k, v in next(iter(val)).items() if k != "labels"}
    result = zb.compress(model, example, zb.parse_budget(args.budget), args.strategy, train_data=train,
                         eval_data=val, test_data=test, finetune_config=zb.FinetuneConfig(epochs=args.epochs))
    print(result.policy)
    print(result.summary())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.zbit")
        zb.save(result, path)
        small = zb.load(path, build(), example_inputs=example)
        heads = [layer.attention.self.num_attention_heads for layer in small.bert.encoder.layer]
        print(f"file {os.path.getsize(path):,} B; heads left per layer {heads}; "
              f"loaded model: {task.metric(small, test):.1%} test accuracy")


if __name__ == "__main__":
    main()
