"""PyTorch's nn.MultiheadAttention (alone, and inside nn.TransformerEncoder) as three Linears (zerobit.graph.mha):
the same outputs, heads removed exactly, a file of the promised size that loads back; older files load as written."""

from __future__ import annotations

import itertools
import os
import warnings

import pytest
import torch
from torch import nn

import zerobit as zb
from zerobit.graph.linears import linearized
from zerobit.graph.mha import LinearMultiheadAttention

VOCAB, WIDTH, HEADS = 40, 32, 4


class EncoderClassifier(nn.Module):
    """Token ids → 3 classes through torch.nn's own transformer encoder (2 layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def build() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor's note on odd settings
        return EncoderClassifier().eval()


def batches(n: int, size: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (size, 10), generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("batch_first,bias,kdim", list(itertools.product([True, False], [True, False], [None, 6])))
def test_the_linear_attention_computes_what_pytorchs_does(batch_first, bias, kdim) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    mine = LinearMultiheadAttention(mha).eval()
    q, kv = torch.randn(3, 5, 8), torch.randn(3, 4, kdim or 8)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    padding = torch.tensor([[False] * 4, [False, False, True, True], [False, True, False, False]])
    blocked = torch.rand(5, 4) > 0.7
    blocked[:, 0] = False
    for masks in ({}, {"key_padding_mask": padding}, {"attn_mask": torch.randn(5, 4)},
                  {"attn_mask": blocked, "key_padding_mask": padding}, {"attn_mask": torch.randn(6, 5, 4)}):
        for need_weights, average in ((True, True), (True, False), (False, True)):
            want = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **masks)
            got = mine(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **masks)
            torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
            else:
                assert got[1] is None and want[1] is None
    x = torch.randn(5, 8)  # one sequence, no batch dimension, causal
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    unbatched = nn.MultiheadAttention(8, 2).eval()
    want = unbatched(x, x, x, attn_mask=causal, is_causal=True)
    got = LinearMultiheadAttention(unbatched).eval()(x, x, x, attn_mask=causal, is_causal=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)


def test_an_encoder_is_traced_with_heads_and_its_fp32_size_is_the_originals() -> None:
    model, example = build(), batches(1, 2, 0)[0][0]
    copy = linearized(model)
    assert isinstance(copy.encoder.layers[0].self_attn, LinearMultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)  # the user's model is untouched
    with torch.no_grad():
        torch.testing.assert_close(copy(example), model(example), atol=1e-6, rtol=1e-5)
    graph = zb.analyse(model, example)
    group = graph.groups["encoder.layers.0.self_attn.q_proj"]
    assert sorted(group.layers) == [f"encoder.layers.0.self_attn.{p}_proj" for p in "kqv"]
    assert group.prunable and group.span == WIDTH // HEADS
    assert graph.groups["encoder.layers.0.linear1"].prunable  # MLP neurons
    assert graph.fp32_bytes == zb.analyse(model, example, attention=False).fp32_bytes  # in_proj_weight as one


def test_removing_a_head_equals_switching_it_off() -> None:
    from zerobit.policy import FLOAT_BITS, GroupDecision, Policy
    from zerobit.quant.apply import prune_structure

    model, example, span = build(), batches(1, 2, 0)[0][0], WIDTH // HEADS
    graph = zb.analyse(model, example)
    group = graph.groups["encoder.layers.0.self_attn.q_proj"]
    decisions = {n: GroupDecision((FLOAT_BITS,) * g.channels) for n, g in graph.groups.items()}
    decisions[group.name] = GroupDecision(tuple(0 if span <= c < 2 * span else FLOAT_BITS for c in range(WIDTH)))
    pruned = prune_structure(linearized(model), graph, Policy(decisions, FLOAT_BITS), example)  # as compress does
    attn = pruned.encoder.layers[0].self_attn
    assert attn.num_heads == HEADS - 1 and attn.v_proj.weight.shape == (WIDTH - span, WIDTH)
    masked = build()
    with torch.no_grad():
        masked.encoder.layers[0].self_attn.out_proj.weight[:, span:2 * span] = 0
        torch.testing.assert_close(pruned(example), masked(example), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["uniform", "sbs"])
def test_an_encoder_compresses_with_heads_removed_and_loads(strategy, tmp_path) -> None:
    train, val, example = batches(4, 8, 1), batches(2, 16, 2), batches(1, 2, 0)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = zb.compress(build(), example, zb.Size(fraction=1 / 8), strategy, train_data=train, eval_data=val,
                        finetune_config=zb.FinetuneConfig(epochs=0.5), progress=False)
    assert r.budget.cost(r.graph, r.policy) <= r.budget.limit(r.graph)
    r.save(tmp_path / "m.zbit")
    assert os.path.getsize(tmp_path / "m.zbit") == r.file_bytes
    loaded = zb.load(tmp_path / "m.zbit", build(), example_inputs=example)
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), r.model.eval()(example), atol=1e-5, rtol=1e-5)
    assert min(layer.self_attn.num_heads for layer in loaded.encoder.layers) < HEADS  # at 1/8, heads go


def test_a_version_5_file_holds_the_attention_as_pytorch_does_and_loads(tmp_path) -> None:
    from safetensors.numpy import save_file

    from zerobit.export.container import checksum, read_container
    from zerobit.export.runtime import save_zbit
    from zerobit.quant import apply_policy

    example = batches(1, 2, 0)[0][0]
    graph = zb.analyse(build(), example, attention=False)
    assert "encoder.layers.0.self_attn.in_proj_weight" in graph.extra_params  # float, outside the layers
    policy = zb.Policy({n: zb.GroupDecision((6,) * g.channels) for n, g in graph.groups.items()}, 32)
    q = apply_policy(linearized(build(), attention=False), graph, policy, example).eval()
    save_zbit(q, graph, policy, tmp_path / "now.zbit")
    meta, arrays = read_container(tmp_path / "now.zbit")
    meta["version"] = "5"
    meta["crc32"] = f"{checksum(meta, arrays):08x}"
    save_file(arrays, str(tmp_path / "old.zbit"), metadata=meta)
    loaded = zb.load(tmp_path / "old.zbit", build(), example_inputs=example)
    assert isinstance(loaded.encoder.layers[0].self_attn, nn.MultiheadAttention)
    # PyTorch's fused inference path reads the layers' float weights past zerobit's quantized ones (version 6
    # switches it off); the file holds the quantized model, which the plain path computes
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.testing.assert_close(loaded(example), q(example), atol=1e-5, rtol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(zb.ZbitFormatError, match="different model"):  # read as version 6: other layers
        zb.load(tmp_path / "now.zbit", build(), example_inputs=example)


def test_ignoring_the_attention_module_keeps_its_heads() -> None:
    example = batches(1, 2, 0)[0][0]
    graph = zb.analyse(build(), example, ignored_layers=["encoder.layers.0.self_attn"])
    assert not graph.groups["encoder.layers.0.self_attn.q_proj"].prunable
    assert graph.groups["encoder.layers.1.self_attn.q_proj"].prunable
