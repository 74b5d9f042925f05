"""The peer baseline (bench/peer.py): its file fits the budget on disk, runs in onnxruntime, and the clean-up
that shrinks it changes no output."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the peer baseline needs `pip install onnx onnxruntime onnxscript`")
onnx = pytest.importorskip("onnx")
numpy_helper = onnx.numpy_helper
pytest.importorskip("onnxscript")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is a folder of scripts, not installed
from bench import peer  # noqa: E402
from zerobit import zoo  # noqa: E402
from zerobit.data import get_splits  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return get_splits("fashion-mnist")


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_clean_up_is_lossless(fmt, splits, tmp_path):
    model, example = zoo.load_pretrained("resnet20"), zoo.example_input("resnet20")
    pruned = peer.prune(model, example, 0.25)
    peer.export_float(pruned, example, tmp_path / "float.onnx")
    peer.quantize(tmp_path / "float.onnx", tmp_path / "quant.onnx", fmt, splits.train.x[:128].numpy())
    quantized = onnx.load(str(tmp_path / "quant.onnx"))
    cleaned = peer.clean(quantized)
    onnx.checker.check_model(cleaned, full_check=True)
    onnx.save(cleaned, str(tmp_path / "clean.onnx"))

    x = splits.test.x[:64].numpy()
    np.testing.assert_array_equal(outputs(tmp_path / "clean.onnx", x), outputs(tmp_path / "quant.onnx", x))
    assert (tmp_path / "clean.onnx").stat().st_size < 0.8 * (tmp_path / "quant.onnx").stat().st_size
    for new, old in zip(cleaned.graph.initializer, quantized.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(new), numpy_helper.to_array(old))
        assert new.data_type == old.data_type and new.raw_data
    assert [n.op_type for n in cleaned.graph.node] == [n.op_type for n in quantized.graph.node]
    assert not cleaned.producer_name and not cleaned.metadata_props and not cleaned.graph.value_info
    assert max(len(n) for node in cleaned.graph.node for n in node.output) <= 2

    weight_types = {t.data_type for t in cleaned.graph.initializer if len(t.dims) == 4}  # conv weights
    assert weight_types == {onnx.TensorProto.INT8 if fmt == "int8" else onnx.TensorProto.INT4}

    # the size search probes the pretrained model, so the size must not depend on values: ORT writes zero points
    # as varints (1 byte below 128, 2 above); the clean-up stores them raw
    zero_point = next(t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    raw_sizes, typed_sizes = set(), set()
    for value in (5, 200):
        zero_point.ClearField("raw_data")
        zero_point.int32_data[:] = [value]
        typed_sizes.add(quantized.ByteSize())
        raw_sizes.add(peer.clean(quantized).ByteSize())
    assert len(typed_sizes) == 2 and len(raw_sizes) == 1


@pytest.mark.slow  # two bisections of real export + quantize + clean-up: 1-2 minutes on 2 busy cores
def test_peer_file_fits_the_budget_and_runs(tmp_path):
    torch.manual_seed(0)
    row = peer.run_peer("1/4", epochs=0, out_dir=tmp_path, test_limit=500)
    assert row["fp32_bytes"] == 1_106_024 and row["budget_limit"] == pytest.approx(1_106_024 / 4)
    formats = row["info"]["formats"]
    assert set(formats) == {"int8", "int4"}
    for fmt, found in formats.items():
        path = tmp_path / "1over4" / f"{fmt}.onnx"
        assert path.stat().st_size == found["file_bytes"] <= row["budget_limit"]
        assert 0 <= found["ratio"] < 0.2
        assert found["accuracy"] > 0.8  # fp32 0.94 on these images; measured 0.934 (int4) and 0.89 (int8)
    assert formats["int8"]["ratio"] > 0 == formats["int4"]["ratio"]  # int8 of every weight needs > 1/4
    best = max(formats, key=lambda fmt: formats[fmt]["accuracy"])
    assert row["strategy"] == f"peer: torch-pruning + ORT {best}"
    assert row["accuracy"] == formats[best]["accuracy"] and row["file_bytes"] == formats[best]["file_bytes"]


@pytest.mark.slow
def test_peer_reports_an_infeasible_budget(tmp_path):
    row = peer.run_peer("1/128", epochs=0, out_dir=tmp_path, formats=("int4",), test_limit=100)
    assert row["error"].startswith("infeasible: smallest peer file is")
    assert row["info"]["formats"]["int4"]["infeasible"] > 1_106_024 / 128
