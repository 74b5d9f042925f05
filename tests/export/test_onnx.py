"""ONNX export: real files run in onnxruntime agree with the .zbit model; weights are stored as the file's codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import train_tiny
from tiny_models import EXAMPLE, TINY_MODELS

import zerobit as zb
from zerobit.export.onnx import export_onnx, onnx_session, parity
from zerobit.strategies import get_strategy
from zerobit.train.evaluate import accuracy

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

OPTIONS = {"ajpq": {"episodes": 4, "warmup": 2, "rerank": 2, "proxy.samples": 100, "proxy.recovery_batches": 1},
           "admm": {"iterations": 2}}


@pytest.fixture(scope="module")
def trained(digits):
    return {name: train_tiny(name, digits) for name in ("plain", "residual", "depthwise", "layernorm")}


def _compressed(tmp_path, digits, model, strategy: str, budget=None):
    torch.manual_seed(0)
    result = zb.compress(model, EXAMPLE, budget or zb.Size(fraction=1 / 5),
                         get_strategy(strategy, **OPTIONS.get(strategy, {})), train_data=digits.train,
                         eval_data=digits.val, finetune_config=zb.FinetuneConfig(epochs=1), progress=False)
    path = tmp_path / "m.zbit"
    result.save(path)
    return result, path


def _onnx_accuracy(path, data) -> float:
    session = onnx_session(path)
    out = session.run(None, {session.get_inputs()[0].name: data.x.numpy()})[0]
    return float((out.argmax(1) == data.y.numpy()).mean())


def _initializer_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("strategy", ["uniform", "sequential", "opq", "admm", "ajpq", "sbs"])
@pytest.mark.parametrize("name", ["plain", "residual", "depthwise"])
def test_exact_export_computes_what_the_zbit_computes(tmp_path, digits, trained, name, strategy):
    result, path = _compressed(tmp_path, digits, trained[name], strategy)
    report = export_onnx(path, tmp_path / "m.onnx", model=TINY_MODELS[name](), mode="exact")
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    assert report.onnx_bytes == (tmp_path / "m.onnx").stat().st_size
    assert set(report.layers) == set(result.graph.layers)
    loaded = zb.load(path, TINY_MODELS[name]())
    as_stored = all("not a plain" not in kind for kind in report.layers.values())  # every weight in the graph
    if as_stored:
        # the graph as written: the same numbers, up to an activation landing one step away where float
        # summation order moves a value across a rounding boundary
        written = parity(tmp_path / "m.onnx", loaded, digits.test, optimize=False)
        assert written["max_abs_diff"] < 0.25 and written["agreement"] >= 0.99, written
    found = parity(tmp_path / "m.onnx", loaded, digits.test)  # as deployed: fused integer kernels
    assert found["samples"] == len(digits.test)
    assert found["agreement"] >= 0.98, (found, report.layers)
    if as_stored:
        # biases on the accumulator's grid (grid_bias), codebook layers' inputs quantized by float operators: the
        # runtime computes the model's numbers, so on nearly every image the outputs are equal up to float
        # rounding (before, most differed by 0.05–0.25, and codebook layers by up to 3.8)
        session = onnx_session(tmp_path / "m.onnx")
        out = session.run(None, {session.get_inputs()[0].name: digits.test.x.numpy()})[0]
        with torch.no_grad():
            ref = loaded(digits.test.x).numpy()
        exact = (np.abs(out - ref).max(1) < 1e-3).mean()
        assert exact >= 0.99 and found["agreement"] >= 0.99, (exact, found)
    assert _onnx_accuracy(tmp_path / "m.onnx", digits.test) >= accuracy(loaded, digits.test) - 0.02


@pytest.mark.parametrize("name", ["plain", "residual", "depthwise"])
def test_fast_export_runs_integer_kernels_and_agrees(tmp_path, digits, trained, name):
    import onnxruntime as ort

    result, path = _compressed(tmp_path, digits, trained[name], "uniform")
    report = export_onnx(result, tmp_path / "m.onnx", mode="fast")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in trained[name].modules())
    assert ops.count("QLinearConv") == convs, ops  # every conv runs as an integer kernel
    assert "Conv" not in ops
    found = parity(tmp_path / "m.onnx", zb.load(path, TINY_MODELS[name]()), digits.test)
    assert found["agreement"] >= 0.98, (found, report.summary())


def test_weights_are_the_files_codes_with_pruned_widths(tmp_path, digits, trained):
    from onnx import numpy_helper

    result, path = _compressed(tmp_path, digits, trained["plain"], "uniform", zb.Size(fraction=1 / 8))
    export_onnx(path, tmp_path / "m.onnx", model=TINY_MODELS["plain"](), mode="exact", int4=False)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims and np.prod(t.dims) > 64
                   for t in graph.initializer), "a float weight tensor was written"
    codes = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    kept = {n: result.policy[g.out_group].kept for n, g in result.graph.layers.items()}
    assert sorted(c.shape[0] for c in codes) == sorted(kept.values())  # the graph has the pruned widths
    bits = max(max(result.policy[g.out_group].kept_bits()) for g in result.graph.layers.values())
    assert all(np.abs(c).max() <= 2 ** (bits - 1) - 1 for c in codes)


def test_int4_where_every_channel_has_at_most_4_bits(tmp_path, digits, trained):
    graph = zb.analyse(trained["residual"], EXAMPLE)
    result, path = _compressed(tmp_path, digits, trained["residual"], "uniform", zb.Size(fraction=1 / 12))
    assert all(b <= 4 for g in result.policy.groups.values() for b in g.kept_bits()), result.policy
    small = export_onnx(path, tmp_path / "int4.onnx", model=TINY_MODELS["residual"](), mode="exact")
    wide = export_onnx(path, tmp_path / "int8.onnx", model=TINY_MODELS["residual"](), mode="exact", int4=False)
    assert set(small.layers.values()) == {"int4"} and set(wide.layers.values()) == {"int8"}
    assert onnx.TensorProto.INT4 in _initializer_types(tmp_path / "int4.onnx")
    assert small.onnx_bytes < wide.onnx_bytes
    loaded = zb.load(path, TINY_MODELS["residual"]())
    assert parity(tmp_path / "int4.onnx", loaded, digits.test, optimize=False)["max_abs_diff"] < 0.25
    assert parity(tmp_path / "int4.onnx", loaded, digits.test)["agreement"] >= 0.98
    assert len(graph.layers) == len(small.layers)


def test_layers_that_stay_float_are_named(tmp_path, digits, trained):
    result, path = _compressed(tmp_path, digits, trained["layernorm"], "uniform")
    report = export_onnx(result, tmp_path / "m.onnx", mode="exact")
    assert set(report.layers) == set(result.graph.layers)
    assert any(kind.startswith("int") for kind in report.layers.values())
    found = parity(tmp_path / "m.onnx", zb.load(path, TINY_MODELS["layernorm"]()), digits.test)
    assert found["agreement"] >= 0.98, (found, report.layers)


def test_clear_errors(tmp_path, digits, trained):
    result, path = _compressed(tmp_path, digits, trained["residual"], "uniform")
    with pytest.raises(TypeError, match="CompressResult or the path"):
        export_onnx(result.model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="calibration_data"):
        export_onnx(path, tmp_path / "m.onnx", model=TINY_MODELS["residual"]())
    with pytest.raises(ValueError, match="mode"):
        export_onnx(path, tmp_path / "m.onnx", model=TINY_MODELS["residual"](), mode="quick")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.zbit").write_bytes(bytes(data))
    with pytest.raises(zb.ZbitFormatError):
        export_onnx(tmp_path / "bad.zbit", tmp_path / "m.onnx", model=TINY_MODELS["residual"](), mode="exact")
    assert not (tmp_path / "m.onnx").exists()


class _Branchy(torch.nn.Module):
    """Python control flow on a tensor's value: runs in eager mode and traces for pruning, but torch.export
    cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if float(y.mean()) > 1e9:
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


def test_a_model_the_exporter_cannot_capture_is_a_clear_error(tmp_path, digits):
    torch.manual_seed(0)
    result = zb.compress(_Branchy().eval(), EXAMPLE, zb.Size(fraction=0.8), "uniform", train_data=digits.train,
                         eval_data=digits.val, finetune_config=zb.FinetuneConfig(epochs=0.1), progress=False)
    with pytest.raises(ValueError, match="torch.onnx.export could not export _Branchy"):
        export_onnx(result, tmp_path / "m.onnx", mode="exact")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("strategy", ["uniform", "admm"])
def test_a_vision_transformer_exports_with_every_linear_stored_as_codes(tmp_path, digits, strategy):
    """Linears on (B, T, C) export as MatMul with the weight folded to Wᵀ: the codes go there too (axis 1), and
    attention heads removed by the policy are gone from the file."""
    from zerobit.zoo.vit import ViT

    torch.manual_seed(0)
    model = ViT(dim=16, depth=1, heads=2, hidden=32, patch=4, image=8).eval()
    # ADMM keeps every channel: at 1/5 their scales, biases and embeddings alone exceed the budget (it refuses)
    result, path = _compressed(tmp_path, digits, model, strategy, zb.Size(fraction=1 / 4 if strategy == "admm"
                                                                          else 1 / 5))
    fresh = ViT(dim=16, depth=1, heads=2, hidden=32, patch=4, image=8)
    report = export_onnx(path, tmp_path / "m.onnx", model=fresh, mode="exact")
    assert all(not kind.startswith("float") for kind in report.layers.values()), report.layers
    assert sum(kind.startswith(("int", "uint", "codebook")) for kind in report.layers.values()) >= 4
    written = parity(tmp_path / "m.onnx", zb.load(path, fresh), digits.test, optimize=False)
    assert written["max_abs_diff"] < 0.25 and written["agreement"] >= 0.99, written


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_text_model_exports_with_its_token_id_inputs(tmp_path, mode):
    """A Hugging Face BERT compressed on dict batches: the file takes input_ids and attention_mask (any batch and
    sequence length), its embedding tables are int8 codes looked up by Gather, and onnxruntime computes what the
    .zbit model computes."""
    pytest.importorskip("transformers")
    from onnx import TensorProto
    from test_transformers import bert, token_batches

    train = token_batches(3, 8, 1)
    example = {k: v[:2] for k, v in train[0].items() if k != "labels"}
    r = zb.compress(bert(), example, zb.Size(fraction=1 / 6), "uniform", train_data=train, eval_data=train,
                    finetune_config=zb.FinetuneConfig(epochs=0), progress=False)
    r.save(tmp_path / "bert.zbit")
    report = export_onnx(r, tmp_path / "bert.onnx", mode=mode)
    assert report.layers["bert.embeddings.word_embeddings"].startswith(("int", "uint"))
    graph = onnx.load(str(tmp_path / "bert.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert not any(t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 60 * 32 for t in graph.initializer)
    loaded = zb.load(tmp_path / "bert.zbit", bert(), example_inputs=example)
    longer = token_batches(2, 5, 2)  # other batch size, and 16 tokens instead of 12
    longer = [{k: (v.repeat(1, 2)[:, :16] if v.dim() == 2 else v) for k, v in b.items()} for b in longer]
    for data in (train, longer):
        found = parity(tmp_path / "bert.onnx", loaded, data)
        assert found["samples"] == sum(len(b["input_ids"]) for b in data)
        if mode == "exact":
            assert found["agreement"] == 1.0 and found["max_abs_diff"] < 1e-3, found
        else:
            assert found["agreement"] >= 0.9, found
    with pytest.raises(ValueError, match="example_inputs"):  # a .zbit path needs an input to trace
        export_onnx(tmp_path / "bert.zbit", tmp_path / "again.onnx", model=bert())


@pytest.mark.parametrize("bits", [8, 4])
def test_a_channel_whose_weights_are_all_zero_exports_exactly(tmp_path, digits, trained, bits):
    """Unstructured sparsity can zero a whole channel of one layer of a group (a depthwise conv of MobileNetV2
    under OPQ): it has no step of its own. It used to store a scale of 0, and onnxruntime's fused integer kernels,
    which quantize the bias with the weight's scale, then computed garbage (97% agreement in mode exact)."""
    from zerobit.export.runtime import save_zbit
    from zerobit.quant.apply import apply_policy, quant_layers
    from zerobit.train.calibrate import calibrate_activations

    model = trained["depthwise"]
    graph = zb.analyse(model, EXAMPLE)
    policy = zb.Policy({n: zb.GroupDecision((bits,) * g.channels) for n, g in graph.groups.items()}, 8)
    q = apply_policy(model, graph, policy, EXAMPLE)
    layers = quant_layers(q)
    with torch.no_grad():
        for name in ("dw.0", "project.0"):  # a dead channel in a depthwise and in a plain conv
            layers[name].layer.weight[1] = 0.0
            layers[name].set_bits([bits] * len(layers[name].bits))
    calibrate_activations(q, [(digits.train.x[:256], None)])
    q.eval()
    assert all(float(s) > 0 for s in layers["dw.0"].deploy().scale)
    save_zbit(q, graph, policy, tmp_path / "m.zbit")
    export_onnx(tmp_path / "m.zbit", tmp_path / "m.onnx", model=model, mode="exact")
    found = parity(tmp_path / "m.onnx", zb.load(tmp_path / "m.zbit", model), digits.test)
    assert found["agreement"] == 1.0 and found["max_abs_diff"] < 1e-3, found
