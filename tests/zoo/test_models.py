"""Tests for zerobit.zoo: model structure, traceability and the committed checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from conftest import all_cores
from torch import nn

from zerobit import zoo
from zerobit.data import Splits, fashion_mnist_splits
from zerobit.data import fashion_mnist as fm
from zerobit.train.evaluate import accuracy, predictions
from zerobit.train.train import TrainRecipe, loop_spec, train

NAMES = zoo.names()
CNNS = list(zoo.CNNS)


@pytest.fixture(scope="module")
def splits() -> Splits:
    return fashion_mnist_splits()


def test_names_and_unknown_model() -> None:
    assert NAMES == ["mobilenetv2", "resnet20", "vgg", "vit"]
    with pytest.raises(ValueError, match="mobilenetv2, resnet20, vgg, vit"):
        zoo.build("alexnet")
    with pytest.raises(ValueError, match="available"):
        zoo.load_pretrained("alexnet")


@pytest.mark.parametrize("name", CNNS)
def test_build_forward_and_structure(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    x = zoo.example_input(name, batch=3)
    assert x.shape == (3, 1, 28, 28) and torch.equal(zoo.example_input(name), zoo.example_input(name))
    assert model(x).shape == (3, 10)
    modules = list(model.modules())
    assert isinstance(modules[-1], nn.Linear) and modules[-1].out_features == 10
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in modules)
    for m in modules:
        if isinstance(m, nn.ReLU | nn.ReLU6):
            assert not m.inplace
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


@pytest.mark.parametrize("name", CNNS)
def test_every_conv_feeds_a_batchnorm(name: str) -> None:
    gm = torch.fx.symbolic_trace(zoo.build(name))
    mods = dict(gm.named_modules())
    convs = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            convs += 1
            users = list(node.users)
            assert len(users) == 1 and isinstance(mods.get(users[0].target), nn.BatchNorm2d), node.target
    assert convs >= 6


@pytest.mark.parametrize("name", CNNS)
def test_fx_trace_matches_eager(name: str) -> None:
    model = zoo.build(name).eval()
    gm = torch.fx.symbolic_trace(model)
    x = zoo.example_input(name, batch=2)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("name", CNNS)
def test_torch_pruning_dependency_graph(name: str) -> None:
    tp = pytest.importorskip("torch_pruning")
    model = zoo.build(name).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 28, 28))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m in dg.module2node for m in convs)
    groups = list(dg.get_all_groups(root_module_types=[nn.Conv2d]))
    assert len(groups) >= 3


def test_resnet20_shape() -> None:
    model = zoo.build("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts
    assert 260_000 < sum(p.numel() for p in model.parameters()) < 280_000


def test_few_training_steps_reduce_loss(splits: Splits) -> None:
    small = Splits(splits.train.subset(128), splits.val.subset(64), splits.test.subset(64), 10, (1, 28, 28))
    torch.manual_seed(0)
    model = zoo.build("vgg")
    hist = train(model, small, TrainRecipe(epochs=2, batch_size=32, warmup_epochs=0), progress=False)
    assert hist["train_loss"][1] < hist["train_loss"][0]
    assert next(model.parameters()).is_contiguous()  # memory format restored after channels-last training
    with torch.no_grad():
        by_hand = model.eval()(small.val.x).argmax(1)  # eval mode: BatchNorm on running statistics
    model.train()
    assert torch.equal(predictions(model, small.val, batch_size=7), by_hand)  # batching changes nothing
    assert accuracy(model, small.val) == int((by_hand == small.val.y).sum()) / 64
    assert model.training  # the caller's mode is restored


def test_lr_schedule_warmup_and_decay() -> None:
    f = loop_spec(TrainRecipe(epochs=4, warmup_epochs=1), steps_per_epoch=100).lr_factor
    assert f(0) == pytest.approx(0.1) and f(100) == pytest.approx(1.0)
    assert f(50) < f(100) and f(399) < 0.01
    with pytest.raises(ValueError, match="schedule"):
        TrainRecipe(schedule="step")


def test_missing_checkpoint_message(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="zerobit train --model vgg"):
        zoo.load_pretrained("vgg")


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_loads_and_matches_its_card(name: str, splits: Splits) -> None:
    card = zoo.card(name)
    model = zoo.load_pretrained(name)
    assert not model.training
    assert (card["model"], card["dataset"], tuple(card["input_shape"])) == (name, "fashion-mnist", zoo.INPUT_SHAPE)
    assert card["normalization"] == {"mean": fm.MEAN, "std": fm.STD}  # the inputs it was trained on
    assert card["params"] == sum(p.numel() for p in model.parameters())
    # 500 test images: the binomial standard error is ~0.011, so 0.03 is ~3 of them (the slow test is exact)
    assert accuracy(model, splits.test.subset(500)) == pytest.approx(card["test_accuracy"], abs=0.03)


@pytest.mark.slow  # 10k test images: ~20-30 s per model on a busy 2-core CPU
@pytest.mark.parametrize("name", NAMES)
def test_pretrained_reproduces_card_accuracy(name: str, splits: Splits) -> None:
    card = zoo.card(name)
    model = zoo.load_pretrained(name)
    with all_cores():
        acc = accuracy(model, splits.test)
    assert acc == pytest.approx(card["test_accuracy"], abs=2e-4)
    assert acc >= {"resnet20": 0.93, "vgg": 0.93, "mobilenetv2": 0.92, "vit": 0.87}[name]
