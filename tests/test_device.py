"""Devices: names resolve or fail clearly, batches follow the model, the user's model comes back as it went in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import zerobit
from zerobit import FinetuneConfig, Size, compress
from zerobit.cli import main
from zerobit.data.loaders import Batches, TensorData, plain_strides
from zerobit.device import autocast_dtype, model_device, move, resolve


def test_names_resolve_and_unknown_or_missing_devices_fail_clearly():
    assert resolve("cpu") == torch.device("cpu") and resolve(torch.device("cpu")).type == "cpu"
    assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve("cuda:0")


def test_cli_names_a_missing_gpu_in_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["compress", "--budget", "1/8", "--out", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_precision_is_float32_unless_asked_or_native():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "float32") == torch.float32
    assert autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(cpu, "fp8")
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(precision="half")


def test_batches_have_plain_strides_and_move_to_the_model():
    """A (N, 1, H, W) tensor permuted from (N, H, W, 1) counts as contiguous but carries channels-last strides."""
    odd = torch.randn(6, 5, 5, 1).permute(0, 3, 1, 2)
    assert odd.is_contiguous() and odd.stride() != (25, 25, 5, 1)
    fixed = plain_strides(odd)
    assert fixed.stride() == (25, 25, 5, 1) and torch.equal(fixed, odd)
    data = TensorData(odd.contiguous(), torch.zeros(6, dtype=torch.int64))
    for augment in (False, True):
        x, _ = next(iter(Batches(data, 4, shuffle=True, augment=augment)))
        assert x.stride() == (25, 25, 5, 1)
    net = torch.nn.Linear(3, 2)
    assert model_device(net).type == "cpu" and move((odd, odd), model_device(net))[0] is odd


def test_heavily_pruned_resnet_fine_tunes_on_one_thread():
    """Regression: torch 2.13's CPU backward corrupted memory (segfault or `free(): invalid next size`) on one
    thread for augmented Fashion-MNIST batches with channels-last strides and a 1/128 ResNet-20."""
    code = textwrap.dedent("""
        import torch
        torch.set_num_threads(1)
        from zerobit import zoo, Size, FinetuneConfig
        from zerobit.data import get_splits
        from zerobit.graph import analyse
        from zerobit.importance import group_scores
        from zerobit.quant.apply import prune_structure
        from zerobit.strategies import Problem, get_strategy
        from zerobit.train.finetune import finetune
        m, ex, s = zoo.load_pretrained("resnet20").eval(), zoo.example_input("resnet20"), get_splits("fashion-mnist")
        g = analyse(m, ex)
        p = Problem(m, g, Size(fraction=1 / 128), ex, s.train, s.val, group_scores(m, g), progress=False)
        net = prune_structure(m, g, get_strategy("uniform").search(p).policy, ex)
        h = finetune(net, s.train.subset(2048), FinetuneConfig(precision="float32"), progress=False, steps=8)
        print("finite", all(map(lambda v: v == v, h["loss"])))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "finite True" in run.stdout


def test_compress_puts_the_users_model_back_as_it_came(trained_plain, digits):
    model = trained_plain.train()  # in training mode on purpose
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = compress(model, digits.train.x[:1], Size(fraction=1 / 4), "uniform", train_data=digits.train,
                 eval_data=digits.val, finetune_config=FinetuneConfig(epochs=0.2), progress=False, device="cpu")
    assert model.training and model_device(model).type == "cpu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.to_dict()["device"] == "cpu" and model_device(r.model).type == "cpu"
    model.eval()


def test_load_places_the_model_on_the_asked_device(trained_plain, digits, tmp_path):
    r = compress(trained_plain, digits.train.x[:1], Size(fraction=1 / 4), "uniform", train_data=digits.train,
                 eval_data=digits.val, finetune_config=FinetuneConfig(epochs=0), progress=False, device="cpu")
    path = tmp_path / "m.zbit"
    r.save(path)
    back = zerobit.load(path, trained_plain, device="cpu")
    assert model_device(back).type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        zerobit.load(path, trained_plain, device="tpu")
