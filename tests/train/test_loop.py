"""The one training loop: clipping, schedules, per-epoch callbacks; and learned step sizes (LSQ) in QAT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import train_tiny
from tiny_models import TINY_MODELS

import zerobit
from zerobit import FinetuneConfig, Size, compress
from zerobit.data.loaders import Batches
from zerobit.quant.apply import quant_layers
from zerobit.quant.modules import QuantLayer
from zerobit.quant.uniform import learned_quant
from zerobit.train.evaluate import predictions
from zerobit.train.finetune import finetune
from zerobit.train.loop import LoopSpec, fit, make_optimizer
from zerobit.train.train import TrainRecipe, train


def test_clipping_bounds_a_huge_step(digits):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    before = torch.cat([net[1].weight.detach().flatten(), net[1].bias.detach()])
    spec = LoopSpec(steps=1, lr=0.1, momentum=0.0, nesterov=False, clip_norm=1.0, schedule="constant")
    hist = fit(net, Batches(digits.train, 32), spec, lambda m, b: 1e6 * F.cross_entropy(m(b[0]), b[1]), progress=False)
    assert hist["clipped"] == 1 and hist["grad_norm"] > 1e3
    after = torch.cat([net[1].weight.detach().flatten(), net[1].bias.detach()])
    assert float((after - before).norm()) <= 0.1 * 1.0 * 1.001  # lr × clip norm


def test_no_weight_decay_on_one_dimensional_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = make_optimizer(net.parameters(), LoopSpec(steps=1, lr=0.1, weight_decay=0.5))
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == 1 and decayed[0] is net[0].weight


def test_zoo_training_runs_through_the_loop_with_a_report_per_epoch(digits):
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]()
    recipe = TrainRecipe(epochs=6, batch_size=32, lr=0.1, warmup_epochs=0, channels_last=False)
    hist = train(model, digits, recipe, progress=False)
    assert hist["epoch"] == [1, 2, 3, 4, 5, 6] and hist["restarts"] == []
    assert hist["train_loss"][-1] < hist["train_loss"][0] and hist["val_accuracy"][-1] > 0.5


def test_learned_steps_receive_the_lsq_gradient():
    w = torch.tensor([[0.3, -0.9, 0.05, 2.0]], requires_grad=True)
    step = torch.tensor([0.25], requires_grad=True)
    out = learned_quant(w, torch.tensor([3]), step)  # 3 bits: codes −3 … 3
    assert torch.allclose(out, torch.tensor([[0.25, -0.75, 0.0, 0.75]]))
    out.sum().backward()
    # d/ds of round(clamp(w/s))·s: round(v) − v inside the range, ±Q where clipped; scaled by 1/sqrt(n·Q)
    v = torch.tensor([1.2, -3.6, 0.2, 8.0])
    expected = (torch.tensor([1.0, -3.0, 0.0, 3.0]) - torch.where(v.abs() < 3, v, torch.zeros(4))).sum()
    assert torch.allclose(step.grad, expected / (4 * 3) ** 0.5 * torch.ones(1), atol=1e-5)
    assert torch.equal(w.grad, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))  # straight through inside the range only


@pytest.fixture(scope="module")
def teacher(digits):
    return train_tiny("plain", digits)


def test_lsq_fine_tune_learns_steps_and_the_file_holds_them(teacher, digits, tmp_path):
    r = compress(teacher, digits.train.x[:1], Size(fraction=1 / 10), "uniform", train_data=digits.train,
                 eval_data=digits.val, finetune_config=FinetuneConfig(epochs=1, quantizer="lsq"), progress=False)
    layers = quant_layers(r.model)
    assert all(q.log_step is not None for q in layers.values())
    start = {n: q.layer.weight.detach().abs().flatten(1).amax(1) * q.clip / (2.0 ** (q.bits - 1) - 1)
             for n, q in layers.items()}
    moved = [n for n, q in layers.items() if not torch.allclose(q.log_step.detach().exp(), start[n], rtol=1e-3)]
    assert moved, "no learned step moved from its start"
    learned = [q.act for q in layers.values() if getattr(q.act, "log_scale", None) is not None]
    assert learned and all(torch.allclose(a.scale, a.log_scale.detach().exp()) for a in learned)  # file = learned
    path = tmp_path / "lsq.zbit"
    assert r.save(path) == path.stat().st_size == r.file_bytes
    back = zerobit.load(path, teacher)
    assert torch.equal(predictions(back, digits.test), predictions(r.model, digits.test))


def test_eval_mode_of_an_lsq_layer_is_what_training_quantizes():
    torch.manual_seed(0)
    q = QuantLayer(torch.nn.Conv2d(3, 4, 3), None, [2, 3, 4, 0], act_bits=32)
    q.learn_steps()
    with torch.no_grad():
        q.log_step.add_(torch.tensor([0.7, 1.3, 1.0, 1.0]).log())
    q.train()
    trained = q._quantized_weight().detach()
    assert torch.allclose(q.deploy().weight, trained, atol=1e-3 * float(trained.abs().max()))  # float16 scales
    assert torch.equal(trained[3], torch.zeros_like(trained[3]))


def test_a_second_fine_tune_keeps_the_learned_steps(teacher, digits):
    r = compress(teacher, digits.train.x[:1], Size(fraction=1 / 10), "uniform", train_data=digits.train,
                 eval_data=digits.val, finetune_config=FinetuneConfig(epochs=0.3, quantizer="lsq"), progress=False)
    steps = {n: q.log_step.detach().clone() for n, q in quant_layers(r.model).items()}
    finetune(r.model, digits.train, FinetuneConfig(quantizer="lsq", lr=1e-9), progress=False, steps=2)
    assert all(torch.allclose(q.log_step, steps[n], atol=1e-6) for n, q in quant_layers(r.model).items())


class _Killed(Exception):
    pass


def _resumable_fit(model, data, path, kill_after: int | None = None, lr: float = 0.05):
    from zerobit.train.loop import Checkpoint

    def on_epoch(epoch: int, loss: float) -> str:
        if kill_after is not None and epoch > kill_after:
            raise _Killed  # the process dies after this epoch's work, before its checkpoint is written
        return ""

    batches = Batches(data, 32, shuffle=True, augment=True, seed=3)
    spec = LoopSpec(steps=4 * len(batches), lr=lr, steps_per_epoch=len(batches))
    return fit(model, batches, spec, lambda m, b: F.cross_entropy(m(b[0]), b[1]), progress=False,
               on_epoch=on_epoch, checkpoint=None if path is None else Checkpoint(path, {"run": "a"}))


def test_a_killed_fit_resumes_from_its_last_epoch_as_if_never_stopped(digits, tmp_path):
    small = digits.train.subset(200)
    torch.manual_seed(0)
    start = TINY_MODELS["plain"]()
    whole = copy.deepcopy(start)
    _resumable_fit(whole, small, None)
    killed = copy.deepcopy(start)
    with pytest.raises(_Killed):
        _resumable_fit(killed, small, tmp_path / "fit.ckpt", kill_after=2)
    resumed = copy.deepcopy(start)  # a new process: the original weights, and the file
    history = _resumable_fit(resumed, small, tmp_path / "fit.ckpt")
    assert len(history["loss"]) == 4 * 7  # the 2 epochs before the kill come from the file
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(killed.state_dict().values(), whole.state_dict().values(),
                                                       strict=True))


def test_a_checkpoint_of_another_run_or_a_damaged_one_is_refused(digits, tmp_path):
    from zerobit.train.loop import Checkpoint

    small = digits.train.subset(64)
    path = tmp_path / "fit.ckpt"
    _resumable_fit(TINY_MODELS["plain"](), small, path)
    spec = LoopSpec(steps=4, lr=0.05, steps_per_epoch=2)

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.raises(ValueError, match="belongs to another run"):
        fit(TINY_MODELS["plain"](), Batches(small, 32), spec, loss, progress=False,
            checkpoint=Checkpoint(path, {"run": "b"}))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable zerobit training checkpoint"):
        fit(TINY_MODELS["plain"](), Batches(small, 32), spec, loss, progress=False,
            checkpoint=Checkpoint(path, {"run": "a"}))


def test_a_killed_compress_resumes_its_fine_tune_and_ends_as_an_uninterrupted_one(digits, tmp_path, monkeypatch):
    from zerobit.train.loop import Checkpoint

    model = train_tiny("residual", digits, epochs=4)

    def run(checkpoint=None):
        config = FinetuneConfig(epochs=3, lr=0.02, checkpoint=checkpoint and str(checkpoint))
        return compress(model, digits.train.x[:1], Size(fraction=1 / 6), "uniform", train_data=digits.train,
                        eval_data=digits.val, finetune_config=config, progress=False)

    whole = run()
    saves, save = [], Checkpoint.save

    def save_then_die(self, *args):
        save(self, *args)
        saves.append(args[-2])
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first epoch was saved

    monkeypatch.setattr(Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "finetune.state")
    monkeypatch.setattr(Checkpoint, "save", save)
    resumed = run(tmp_path / "finetune.state")
    assert resumed.accuracy == whole.accuracy and resumed.policy == whole.policy
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one process"):
        FinetuneConfig(checkpoint="x", processes=2)
