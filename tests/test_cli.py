"""End to end on the real thing: pretrained ResNet-20, Fashion-MNIST, the command line, the written file."""

from __future__ import annotations

import json
import os

import pytest
from conftest import all_cores

from zerobit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("r20")
    with all_cores():
        code = main(["compress", "--model", "resnet20", "--data", "fashion-mnist", "--budget", "1/32",
                     "--strategy", "uniform", "--finetune-epochs", "0.02", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture
def cores():
    with all_cores():
        yield


def test_compress_writes_the_promised_file(compressed):
    result = json.loads((compressed / "result.json").read_text())
    for key in ("file_bytes", "fp32_bytes", "budget_bytes", "accuracy", "baseline_accuracy", "bops", "macs",
                "strategy", "seconds"):
        assert key in result
    size = os.path.getsize(compressed / "model.zbit")
    assert size == result["file_bytes"] <= result["budget_bytes"] == pytest.approx(result["fp32_bytes"] / 32)
    assert result["baseline_accuracy"] >= 0.93
    assert result["accuracy"] > 0.4  # 32× smaller after 7 fine-tune steps (a fragile state): still 4× chance
    assert (compressed / "policy.json").exists()


def test_eval_of_the_file_matches_the_reported_accuracy(compressed, capsys, cores):
    assert main(["eval", str(compressed / "model.zbit"), "--data", "fashion-mnist", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    result = json.loads((compressed / "result.json").read_text())
    assert out["accuracy"] == result["accuracy"]  # decoded file == measured fake-quant model, on 10k test images


def test_impossible_budget_exits_with_clear_message(tmp_path, capsys):
    code = main(["compress", "--model", "resnet20", "--budget", "100B", "--out", str(tmp_path), "--quiet"])
    assert code == 2
    assert "smallest achievable" in capsys.readouterr().err
    assert not (tmp_path / "model.zbit").exists()


def test_corrupt_file_exits_with_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.zbit"
    bad.write_bytes(os.urandom(1000))
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.zbit is corrupt" in err and err.count("\n") == 1


def test_export_writes_an_onnx_file_onnxruntime_agrees_with(compressed, capsys, cores):
    pytest.importorskip("onnxruntime")
    import onnx

    out = compressed / "model.onnx"
    assert main(["export", str(compressed / "model.zbit"), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in printed
    agreement = float(printed.split("test images: ")[1].split("%")[0])
    assert agreement >= 97.0, printed  # a 7-step fine-tune: small output margins, still the same predictions
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert not any(p.key for p in onnx.load(str(out)).metadata_props)
    assert main(["export", str(compressed / "model.zbit"), "--format", "tflite", "--out", str(out)]) == 2
    assert "unknown format" in capsys.readouterr().err
