"""Data-parallel fine-tuning in real processes (gloo on the CPU): it reproduces the single-process fine-tune."""

from __future__ import annotations

import atexit
import copy
import os

import pytest
import torch
import torch.distributed as dist
from tiny_models import EXAMPLE, TINY_MODELS
from torch import nn

from zerobit.data.loaders import Batches
from zerobit.graph import analyse
from zerobit.policy import GroupDecision, Policy
from zerobit.quant.apply import apply_policy
from zerobit.train.calibrate import calibrate_activations
from zerobit.train.distributed import rows, shard, spawn_finetune, world
from zerobit.train.evaluate import accuracy
from zerobit.train.finetune import FinetuneConfig, finetune

LIMIT = 120  # seconds a spawned run may take before the test fails instead of hanging


class FailsInRank(list):
    """Batches whose iteration raises in process rank 1 (module level: it is pickled to the processes)."""

    def __iter__(self):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise OSError("the data of rank 1 broke on purpose")
        return super().__iter__()


class MLP(nn.Module):
    """No BatchNorm: data-parallel steps equal single-process ones up to float rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class AbortsAtExit(MLP):
    """An MLP whose copy in a spawned process aborts that process as it exits (SIGABRT, as gloo's threads once
    did on CI after a finished fine-tune)."""

    def __init__(self) -> None:
        super().__init__()
        self.home = os.getpid()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if os.getpid() != self.home:
            atexit.register(os.abort)


def fake_quant_mlp(digits) -> tuple[nn.Module, nn.Module]:
    """(4-bit weights / 8-bit activations fake-quant MLP, its float teacher)."""
    torch.manual_seed(0)
    teacher = MLP().eval()
    graph = analyse(teacher, EXAMPLE)
    policy = Policy({name: GroupDecision((4,) * g.channels) for name, g in graph.groups.items()}, 8)
    student = apply_policy(teacher, graph, policy, EXAMPLE)
    calibrate_activations(student, Batches(digits.train, 256))
    return student, teacher


def max_difference(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel())


def test_two_processes_train_the_fake_quant_model_as_one_does(digits):
    student, teacher = fake_quant_mlp(digits)
    # 33 = 17 + 16 examples per process; learned steps (LSQ) add parameters the caller's model must receive
    config = FinetuneConfig(epochs=1, lr=0.05, batch_size=33, seed=3, precision="float32", quantizer="lsq")
    single = copy.deepcopy(student)
    one = finetune(single, digits.train, config, teacher=teacher, progress=False)
    two = spawn_finetune(student, digits.train, config, teacher=teacher, processes=2, timeout=LIMIT)
    assert len(two["loss"]) == len(one["loss"]) == one["steps"] == len(digits.train) // 33
    assert max_difference(student, single) < 1e-4
    assert max(abs(a - b) for a, b in zip(one["loss"], two["loss"], strict=True)) < 1e-4
    assert not student.training and two["restarts"] == one["restarts"] == []


def test_batchnorm_model_trains_in_two_processes_close_to_one(digits):
    # BatchNorm normalizes with each process's half batch: the runs drift apart step by step (at this rate the
    # weights differ by ~0.7 after 111 steps), so they are compared by what they learned
    torch.manual_seed(0)
    model = TINY_MODELS["plain"]()
    single = copy.deepcopy(model)
    config = FinetuneConfig(epochs=3, lr=0.3, batch_size=32, seed=1, precision="float32", distill=0.0)
    one = finetune(single, digits.train, config, progress=False)
    two = finetune(model, digits.train, FinetuneConfig(**(config.to_dict() | {"processes": 2})), progress=False)
    first, last = sum(two["loss"][:5]) / 5, sum(two["loss"][-10:]) / 10
    assert last < 0.7 * first  # it learns (2.32 → 1.48)
    assert abs(last - sum(one["loss"][-10:]) / 10) < 0.15  # measured 0.05
    assert abs(accuracy(model, digits.val) - accuracy(single, digits.val)) < 0.07  # measured 0.013 (2 of 150)


def test_a_non_finite_loss_in_one_process_is_skipped_by_all(digits):
    batches = [(x.clone(), y.clone()) for x, y in Batches(digits.train.subset(192), 32)]  # not the shared data
    batches[2][0][16:] = float("nan")  # the half of batch 2 that process 1 reads
    config = FinetuneConfig(epochs=1, lr=0.05, batch_size=32, precision="float32")
    torch.manual_seed(0)
    model = MLP()
    single = copy.deepcopy(model)
    one = finetune(single, batches, config, progress=False)
    two = spawn_finetune(model, batches, config, processes=2, timeout=LIMIT)  # a lone skip would hang
    assert one["restarts"] == two["restarts"] == [2] and len(two["loss"]) == 6
    assert max_difference(model, single) < 1e-5


def test_shard_splits_batches_into_contiguous_parts_that_make_the_whole():
    x, y = torch.randn(7, 3), torch.arange(7)
    for world_size in (1, 2, 3):
        parts = [shard((x, y), r, world_size) for r in range(world_size)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        sizes = [rows(p) for p in parts]
        assert sum(sizes) == 7 and max(sizes) - min(sizes) <= 1
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5), "scale": torch.tensor(2.0)}
    parts = [shard(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert [p["labels"].tolist() for p in parts] == [[0, 1, 2], [3, 4]] and parts[1]["scale"] == 2.0
    assert world() == (0, 1)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        shard(batch, 2, 2)


def test_a_failing_process_is_named_in_the_error(digits):
    batches = FailsInRank(Batches(digits.train.subset(64), 32))
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 \(of 2\) failed.*broke on purpose"):
        spawn_finetune(MLP(), batches, FinetuneConfig(epochs=1, precision="float32"), processes=2, timeout=LIMIT)


def test_a_process_that_crashes_as_it_exits_after_the_work_loses_nothing(digits):
    torch.manual_seed(0)
    model = AbortsAtExit()
    start = copy.deepcopy(model)
    history = spawn_finetune(model, digits.train.subset(256), FinetuneConfig(epochs=1, precision="float32"),
                             processes=2, timeout=LIMIT)
    assert len(history["loss"]) == history["steps"] > 0  # every step of the run came back
    assert max_difference(model, start) > 0  # and the trained weights with it


def test_settings_that_cannot_run_in_processes_are_refused_clearly(digits):
    with pytest.raises(ValueError, match="processes must be at least 1"):
        spawn_finetune(MLP(), digits.train, FinetuneConfig(), processes=0)
    with pytest.raises(ValueError, match="processes ≥ 1"):
        FinetuneConfig(processes=0)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        finetune(MLP(), digits.train, FinetuneConfig(processes=2), penalty=lambda: torch.tensor(0.0))
    with pytest.raises(ValueError, match="nccl backend needs the model on CUDA"):
        spawn_finetune(MLP(), digits.train, FinetuneConfig(), processes=2, backend="nccl")


def test_a_run_past_its_timeout_is_stopped(digits):
    with pytest.raises(TimeoutError, match="did not finish within 0.5 s"):
        spawn_finetune(MLP(), digits.train, FinetuneConfig(epochs=50, precision="float32"), processes=2,
                       timeout=0.5)


def test_compress_fine_tunes_in_two_processes_end_to_end(tmp_path, trained_residual, digits):
    import zerobit as zb
    from zerobit.budget import Size

    def run(processes: int):
        torch.manual_seed(0)
        return zb.compress(trained_residual, EXAMPLE, Size(fraction=1 / 4), "uniform", train_data=digits.train,
                           eval_data=digits.val, test_data=digits.test, progress=False,
                           finetune_config=FinetuneConfig(epochs=2, processes=processes))

    one, two = run(1), run(2)
    assert two.policy == one.policy
    assert abs(two.accuracy - one.accuracy) < 0.03 and two.accuracy > 0.85
    two.save(tmp_path / "m.zbit")  # the weights trained in the processes are the ones saved and measured
    loaded = zb.load(tmp_path / "m.zbit", copy.deepcopy(trained_residual))
    assert accuracy(loaded, digits.test) == pytest.approx(two.accuracy, abs=1e-9)
