"""Transformers from Hugging Face configs: attention heads and MLP neurons as coupled groups, Size and BOPs budgets
with every strategy that handles Linear layers, and .zbit round trips with the heads physically removed."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import zerobit as zb
from zerobit.strategies import get_strategy

transformers = pytest.importorskip("transformers", reason="these cases need `pip install transformers`")
torch.set_num_threads(1)

HEADS, HIDDEN, CLASSES = 4, 32, 3
OPTIONS = {"ajpq": {"episodes": 4, "warmup": 2, "rerank": 2, "proxy.samples": 64, "proxy.recovery_batches": 2,
                    "proxy.batch_size": 32},
           "admm": {"iterations": 2}}
# OPQ keeps every channel and never quantizes below 2 bits, so a tiny model with float embeddings
# cannot reach 1/8 with it: it gets the budget it can meet
BUDGETS = {"size": lambda s: zb.Size(fraction=1 / 4 if s == "opq" else 1 / 8),
           "bops": lambda s: zb.BOPs(fraction=1 / 64)}


def bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=24, num_labels=CLASSES)
    return BertForSequenceClassification(cfg).eval()


def vit(seed: int = 0) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=2,
                    num_attention_heads=HEADS, intermediate_size=64, num_labels=CLASSES)
    return ViTForImageClassification(cfg).eval()


def token_batches(n: int, size: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 60, (size, 12), generator=g),
             "attention_mask": torch.ones(size, 12, dtype=torch.long),
             "labels": torch.randint(0, CLASSES, (size,), generator=g)} for _ in range(n)]


def image_batches(n: int, size: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, CLASSES, (size,), generator=g))
            for _ in range(n)]


CASES = {"bert": (bert, token_batches, lambda b: {k: v[:2] for k, v in b.items() if k != "labels"}),
         "vit": (vit, image_batches, lambda b: b[0][:2])}


def _run(model: nn.Module, example):
    with torch.no_grad():
        out = model(**example) if isinstance(example, dict) else model(example)
    return out.logits


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_attention_heads") and isinstance(m, nn.Module)
            and any(isinstance(c, nn.Linear) for c in m.children())]


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("strategy", ["uniform", "sequential", "ajpq", "admm", "opq"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compress_save_load(case: str, strategy: str, budget: str, tmp_path) -> None:
    build, data, example_of = CASES[case]
    if strategy in ("opq", "admm") and budget == "bops":
        pytest.skip(f"{strategy} takes Size budgets only (it refuses others before any work)")
    model = build()
    train, val = data(6, 16, 1), data(2, 32, 2)
    example = example_of(train[0])
    strat = get_strategy(strategy, **OPTIONS.get(strategy, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = zb.compress(model, example, BUDGETS[budget](strategy), strat, train_data=train, eval_data=val,
                        finetune_config=zb.FinetuneConfig(epochs=0), progress=False)
    assert r.budget.cost(r.graph, r.policy) <= r.budget.limit(r.graph)
    path = tmp_path / "m.zbit"
    r.save(path)
    assert os.path.getsize(path) == r.file_bytes
    loaded = zb.load(path, build(), example_inputs=example)
    torch.testing.assert_close(_run(loaded, example), _run(r.model.eval(), example), atol=1e-5, rtol=1e-5)
    # every head group decides whole heads; the modules' head counts follow the widths they were left with
    head_groups = [g for g in r.graph.groups.values() if g.span > 1]
    assert len(head_groups) == 2 and all(g.span == HIDDEN // HEADS for g in head_groups)
    for attn in _attention_modules(loaded):
        q = next(c for c in attn.modules() if isinstance(c, nn.Linear))
        assert q.out_features == attn.num_attention_heads * (HIDDEN // HEADS)
    if strategy in ("uniform", "sequential") and budget == "size":
        assert any(a.num_attention_heads < HEADS for a in _attention_modules(loaded)), "no head was removed"
    # embedding tables get bits like any weight (one scale and bit-width per row)
    tables = [n for n, layer in r.graph.layers.items() if layer.kind == "embedding"]
    assert (case == "bert") == bool(tables)
    for name in tables:
        assert max(r.policy[name].bits) <= 8 and r.graph.layers[name].macs == 0


def test_heads_q_k_v_and_the_output_projection_columns_are_one_group() -> None:
    model = vit()
    graph = zb.analyse(model, torch.zeros(1, 1, 16, 16))
    group = graph.groups["vit.layers.0.attention.q_proj"]
    assert set(group.layers) == {f"vit.layers.0.attention.{p}_proj" for p in "qkv"}
    assert group.span == HIDDEN // HEADS and group.prunable
    assert graph.layers["vit.layers.0.attention.o_proj"].in_sources == [(group.name, 1)]
    assert graph.groups["vit.layers.0.mlp.fc1"].span == 1  # MLP neurons: fc1 rows + fc2 columns, one by one
    assert graph.layers["vit.layers.0.mlp.fc2"].in_sources == [("vit.layers.0.mlp.fc1", 1)]
    # the residual stream (patch embedding, o_proj, fc2 and the LayerNorms) shrinks as one group
    residual = graph.groups["vit.embeddings.patch_embeddings.projection"]
    assert {"vit.layers.0.attention.o_proj", "vit.layers.1.mlp.fc2"} <= set(residual.layers)
    # MACs of a Linear on (B, T, C): every token position counts (16 patches + the class token)
    q = graph.layers["vit.layers.0.attention.q_proj"]
    assert q.macs == 17 * HIDDEN * HIDDEN


def test_a_removed_head_leaves_the_other_heads_outputs_unchanged() -> None:
    """Pruning head 1 of layer 0 with zero-bit channels equals masking that head's q/k/v rows by hand: removal
    is exact, not an approximation."""
    model = bert()
    ex = {"input_ids": torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))}
    graph = zb.analyse(model, ex)
    span = HIDDEN // HEADS
    from zerobit.policy import FLOAT_BITS, GroupDecision, Policy
    from zerobit.quant.apply import prune_structure

    groups = {n: GroupDecision((FLOAT_BITS,) * g.channels) for n, g in graph.groups.items()}
    qname = "bert.encoder.layer.0.attention.self.query"
    groups[qname] = GroupDecision(tuple(0 if span <= c < 2 * span else FLOAT_BITS for c in range(HIDDEN)))
    pruned = prune_structure(model, graph, Policy(groups, FLOAT_BITS), ex)
    attn = pruned.bert.encoder.layer[0].attention.self
    assert attn.num_attention_heads == HEADS - 1 and attn.query.weight.shape == (HIDDEN - span, HIDDEN)
    masked = bert()
    with torch.no_grad():  # the same head switched off: its value rows give zero, so its context is zero
        masked.bert.encoder.layer[0].attention.self.value.weight[span:2 * span] = 0
        masked.bert.encoder.layer[0].attention.self.value.bias[span:2 * span] = 0
    torch.testing.assert_close(_run(pruned, ex), _run(masked, ex), atol=1e-5, rtol=1e-4)


def test_a_text_model_meets_a_latency_budget_measured_on_its_token_ids(monkeypatch, tmp_path) -> None:
    """BERT takes token ids: the exported file is timed fed the data's input_ids and attention_mask; the table
    times the Linears, and whole-model timings calibrate the rest (lookups, attention, LayerNorms)."""
    pytest.importorskip("onnxruntime")
    from zerobit.export.latency import measure_policy
    from zerobit.policy import GroupDecision, Policy

    monkeypatch.setenv("ZEROBIT_CACHE", str(tmp_path))
    monkeypatch.setattr("zerobit.export.latency.SESSIONS", 1)  # a behaviour check: one session per timing
    monkeypatch.setattr("zerobit.export.latency.GRID_FRACTIONS", (1 / 4, 1 / 2))  # and fewer widths per layer
    monkeypatch.setattr("zerobit.budget.CALIBRATION_KEEP", (1.0,))  # one calibration export (each takes ~14 s)
    model, batches = bert(), token_batches(3, 8, 0)
    example = {k: v[:2] for k, v in batches[0].items() if k != "labels"}
    graph = zb.analyse(model, example)
    whole = Policy({n: GroupDecision((8,) * g.channels) for n, g in graph.groups.items()}, 8)
    ms = measure_policy(model, graph, whole, example, batches, batch=8, threads=1)  # every channel at 8 bits
    budget = zb.Latency(ms=1.5 * ms, batch=8)  # one the search meets on any CPU, busy or not (a tiny BERT's
    # latency is mostly fixed costs: a budget below the 8-bit model's is met only far down, or not at all)
    r = zb.compress(model, example, budget, "uniform", train_data=batches, eval_data=batches,
                    finetune_config=zb.FinetuneConfig(epochs=0), progress=False)
    assert 0 < r.info["latency_ms"] <= budget.limit(r.graph)  # measured on the exported file
    assert r.info["latency_predicted_ms"] > 0 and r.info["latency_tries"] <= 3


def test_a_label_free_encoder_keeps_its_returned_width_and_quantizes_its_tables() -> None:
    """BertModel without a head returns its hidden states: their width (the residual stream) is kept; the
    distillation-only task compresses it from token ids alone."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=24)
    encoder = BertModel(cfg, add_pooling_layer=False).eval()
    ids = [{"input_ids": b["input_ids"]} for b in token_batches(6, 16, 3)]  # no labels anywhere
    r = zb.compress(encoder, {"input_ids": ids[0]["input_ids"][:1]}, zb.Size(fraction=1 / 8), "uniform",
                    train_data=ids, eval_data=ids[:2], task=zb.Distillation(distance="cosine"),
                    finetune_config=zb.FinetuneConfig(epochs=1, lr=0.01), progress=False)
    with torch.no_grad():
        out = r.model(**ids[0]).last_hidden_state
        ref = encoder(**ids[0]).last_hidden_state
    assert out.shape == ref.shape
    assert r.accuracy == pytest.approx(
        float(torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean()), abs=0.02)
    assert r.accuracy > 0.8  # another random BERT scores ~0.05
    assert r.file_bytes <= r.budget.limit(r.graph) < r.graph.fp32_bytes / 7  # only possible with 8-bit tables
    assert max(r.policy["embeddings.word_embeddings"].bits) <= 8
