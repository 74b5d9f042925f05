"""Tasks and data of any shape: DataLoaders of dict batches, data without labels, Fisher importance with any loss."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import zerobit as zb
from zerobit.graph import analyse
from zerobit.importance import fisher_scores
from zerobit.train.evaluate import accuracy

torch.set_num_threads(1)


class DictDigits(Dataset):
    """Digits as Hugging Face-style examples: {"pixel_values": image, "labels": class}."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.data.x[i], "labels": self.data.y[i]}


class KeywordNet(nn.Module):
    """A model called as model(pixel_values=...) that returns a dict with logits (as HF models do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> dict:
        return {"logits": self.inner(pixel_values)}


def test_a_dataloader_of_dict_batches_works_end_to_end(trained_residual, digits, tmp_path) -> None:
    model = KeywordNet(trained_residual)
    train = DataLoader(DictDigits(digits.train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(DictDigits(digits.val), batch_size=100)
    test = DataLoader(DictDigits(digits.test), batch_size=100)
    example = {"pixel_values": digits.train.x[:1]}
    r = zb.compress(model, example, zb.Size(fraction=1 / 8), "uniform", train_data=train, eval_data=val,
                    test_data=test, finetune_config=zb.FinetuneConfig(epochs=2, lr=0.02), progress=False)
    # the reported metric is the accuracy on the held-out test split, counted here by hand
    with torch.no_grad():
        pred = r.model.eval()(pixel_values=digits.test.x)["logits"].argmax(1)
    assert r.accuracy == pytest.approx(float((pred == digits.test.y).float().mean()))
    assert r.accuracy > 0.8 and r.baseline_accuracy > 0.9
    path = tmp_path / "m.zbit"
    r.save(path)
    assert os.path.getsize(path) == r.file_bytes <= r.budget.limit(r.graph)
    loaded = zb.load(path, KeywordNet(trained_residual), example_inputs=example)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**example)["logits"], r.model(**example)["logits"])


def test_distillation_only_compresses_a_model_whose_data_has_no_labels(trained_plain, digits) -> None:
    images = [digits.train.x[i:i + 64] for i in range(0, len(digits.train), 64)]  # tensors only: no labels
    val = [digits.val.x]
    runs = {}
    for epochs in (0, 2):
        runs[epochs] = zb.compress(trained_plain, digits.train.x[:1], zb.Size(fraction=1 / 6), "uniform",
                                   train_data=images, eval_data=val, task=zb.Distillation(distance="kl"),
                                   finetune_config=zb.FinetuneConfig(epochs=epochs, lr=0.02), progress=False)
    untuned, tuned = runs[0], runs[2]
    assert tuned.baseline_accuracy == pytest.approx(1.0)  # the original against itself
    assert tuned.accuracy > untuned.accuracy  # distilling on unlabelled images brings the outputs closer
    assert tuned.accuracy > 0.9
    # and the labels it never saw: the compressed model still classifies
    assert accuracy(tuned.model, digits.test) > 0.8


def test_the_classification_task_without_labels_says_what_to_use(trained_plain, digits) -> None:
    images = [digits.train.x[:64]]
    with pytest.raises(ValueError, match="Distillation"):
        zb.compress(trained_plain, digits.train.x[:1], zb.Size(fraction=1 / 4), "uniform", train_data=images,
                    eval_data=images, progress=False, finetune_config=zb.FinetuneConfig(epochs=0))


def test_a_one_pass_generator_is_refused_with_a_clear_error(trained_plain, digits) -> None:
    gen = ((digits.train.x[i:i + 64], digits.train.y[i:i + 64]) for i in range(0, 256, 64))
    with pytest.raises(TypeError, match="wrap it in a list"):
        zb.compress(trained_plain, digits.train.x[:1], zb.Size(fraction=1 / 4), "uniform", train_data=gen,
                    eval_data=digits.val, progress=False)


def test_the_task_metric_equals_accuracy_on_tuples_and_on_tensordata(trained_residual, digits) -> None:
    batches = [(digits.test.x[i:i + 50], digits.test.y[i:i + 50]) for i in range(0, len(digits.test), 50)]
    task = zb.Classification()
    assert task.metric(trained_residual, batches) == pytest.approx(accuracy(trained_residual, digits.test))
    assert task.metric(trained_residual, digits.test) == pytest.approx(accuracy(trained_residual, digits.test))


@pytest.mark.parametrize("distance", ["kl", "mse", "cosine"])
def test_label_free_fisher_scores_rank_channels_and_give_a_dead_channel_zero(trained_plain, digits,
                                                                              distance: str) -> None:
    model = trained_plain
    graph = analyse(model, digits.train.x[:1])
    name = next(n for n, g in graph.groups.items() if g.prunable)
    dead = model.__class__()
    dead.load_state_dict(model.state_dict())
    layer = graph.layers[graph.groups[name].layers[0]]
    with torch.no_grad():  # channel 0 outputs exactly zero: its mask has no gradient
        dead.get_submodule(layer.name).weight[0] = 0
        if layer.bn:
            dead.get_submodule(layer.bn).weight[0] = 0
            dead.get_submodule(layer.bn).bias[0] = 0
    unlabelled = [digits.train.x[i:i + 32] for i in range(0, 256, 32)]
    scores = fisher_scores(dead.eval(), graph, unlabelled, batches=4, task=zb.Distillation(distance=distance))
    s = scores[name]
    assert torch.isfinite(s).all()
    assert float(s[0]) == 0.0 and bool((s[1:] > 0).all())


def test_macs_of_a_linear_on_tokens_count_every_position() -> None:
    t, c_in, c_out = 7, 12, 20
    model = nn.Sequential(nn.Linear(c_in, c_out), nn.ReLU(), nn.Linear(c_out, 3))
    graph = analyse(model, torch.zeros(2, t, c_in))
    assert graph.layers["0"].macs == t * c_in * c_out
    assert graph.layers["2"].macs == t * c_out * 3
