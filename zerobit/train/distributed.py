"""Data-parallel fine-tuning with torch.distributed: every process holds the whole model and a share of each batch.

Two ways to use it:

- ``FinetuneConfig(processes=2)``: `finetune` starts 2 local processes (`spawn_finetune`), trains there and loads
  the result into the caller's model. CPU: the gloo backend, the cores split between the processes. CUDA: nccl,
  one GPU per process (gloo on the one GPU when there are fewer GPUs than processes). The model, teacher, data and
  task travel to the processes by pickling, so their classes must be importable (defined at module level).
- ``torchrun --nproc_per_node=2 your_script.py``, the script calling `zerobit.compress` (or `finetune`) with
  a process group initialized (``torch.distributed.init_process_group("gloo")``, or "nccl" with one GPU per
  process): every training loop then runs data-parallel. Every rank must run the same calls in the same order
  under the same seed (so every rank finds the same policy) and only rank 0 should save files. This is also the
  way to run searches whose fine-tunes take callbacks (SBS, ADMM), which cannot travel to spawned processes.

How a step runs (`fit`, when a group of more than one process is initialized): every rank reads the same global
batch (the same seed gives the same order and augmentation) and keeps its contiguous slice of it (`shard`);
DistributedDataParallel averages the gradients, each rank's loss weighted by its share of the batch, so an update
equals the single-process update with the same `FinetuneConfig.batch_size` (up to float rounding; BatchNorm in
train mode normalizes with each rank's own statistics, which differs slightly). Whether a step is skipped as
non-finite is decided by all ranks together. Every trainable parameter must take part in every step's loss.

Example:
    >>> world()
    (0, 1)
    >>> x, y = shard((torch.arange(5), torch.arange(5)), rank=1, world=2)
    >>> x.tolist()
    [3, 4]
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zerobit.device import model_device
from zerobit.task import Task, map_tensors

BACKENDS = ("gloo", "nccl")


def initialized() -> bool:
    """Whether this process belongs to an initialized torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when torch.distributed is not initialized."""
    if not initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(batch: Any, rank: int, world: int) -> Any:
    """Rank `rank`'s contiguous slice, along dim 0, of every tensor in `batch` (a tensor, tuple/list or dict).

    The slices of ranks 0 … world-1 concatenated are the batch; their sizes differ by one at most (the first
    ranks take the extra rows). Tensors without dimensions pass through.

    Example:
        >>> shard({"x": torch.zeros(5, 3)}, rank=0, world=2)["x"].shape
        torch.Size([3, 3])
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return map_tensors(batch, lambda t: t.tensor_split(world)[rank] if t.dim() else t)


def rows(batch: Any) -> int:
    """Examples in a batch: dim 0 of its first tensor with a dimension (nested tuples and dicts searched)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        n = rows(v)
        if n:
            return n
    return 0


class Replicas:
    """The DistributedDataParallel side of `fit`: the wrapped model, batch shards and the collective checks."""

    def __init__(self, model: nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world = world()
        self.device = model_device(model)
        self.model = model
        ids = [self.device] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(model, device_ids=ids)
        self.share = 1.0  # this rank's fraction of the current global batch
        self.checked = False

    def shard(self, batch: Any) -> Any:
        """This rank's part of a global batch (the same batch is read in every rank)."""
        total = rows(batch)
        if total < self.world:
            raise ValueError(f"a batch of {total} examples cannot be split across {self.world} processes; use a "
                             f"batch size of at least {self.world} (and drop the last, incomplete batch)")
        part = shard(batch, self.rank, self.world)
        self.share = rows(part) / total
        return part

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch (all-reduced); not finite when any rank's loss is not."""
        value = loss.detach().float().reshape(1) * self.share
        dist.all_reduce(value)
        return value[0]

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's loss weighted so that DDP's average of the gradients is the global batch's gradient."""
        factor = self.share * self.world
        return loss if factor == 1.0 else loss * factor

    def all_finite(self, norm: float) -> bool:
        """Whether the gradient norm is finite in every rank."""
        bad = torch.tensor([0.0 if math.isfinite(norm) else 1.0], device=self.device)
        dist.all_reduce(bad)
        if not self.checked:  # after the first backward: DDP would fail obscurely at the next step
            self.checked = True
            unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
            if unused:
                raise ValueError(f"data-parallel training needs every trainable parameter in every step's loss; "
                                 f"{len(unused)} got no gradient ({', '.join(unused[:5])}): freeze them "
                                 "(requires_grad=False) or train in one process")
        return float(bad) == 0.0


def spawn_finetune(model: nn.Module, train_data: Iterable, config: Any, teacher: nn.Module | None = None,
                   processes: int = 2, backend: str | None = None, task: Task | None = None,
                   epochs: float | None = None, *, steps: int | None = None, progress: bool = False,
                   timeout: float | None = None) -> dict:
    """`finetune` in `processes` local processes (one data-parallel process group); `model` is updated in place.

    Args:
        model, train_data, config, teacher, task, epochs, steps, progress: as for `finetune` (the progress bar
            is rank 0's).
        processes: processes to start; the CPU cores are split between them.
        backend: "gloo" or "nccl"; default nccl when the model is on CUDA and there is a GPU per process,
            else gloo.
        timeout: seconds the whole run may take (None: no limit); then the processes are stopped.

    Returns:
        Rank 0's loss history (the loss of each global batch).

    Raises:
        ValueError: processes < 1, an unknown backend, or nccl without a GPU per process.
        RuntimeError: a process failed; the message names its rank and holds its error.
        TimeoutError: the run took longer than `timeout`.

    Example:
        >>> # hist = spawn_finetune(qmodel, splits.train, FinetuneConfig(epochs=1), teacher=model, processes=2)
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    backend = _backend(model, processes, backend)
    threads = max(1, _cores() // processes)
    job = {"model": model, "teacher": teacher, "data": train_data, "config": config, "task": task,
           "epochs": epochs, "steps": steps, "progress": progress, "device": model_device(model)}
    with tempfile.TemporaryDirectory(prefix="zerobit-ddp-") as tmp:
        folder = Path(tmp)
        _save_job(job, folder / "job.pt")
        args = (processes, _free_port(), backend, threads, str(folder))
        context = torch.multiprocessing.start_processes(_run_rank, args, nprocs=processes, join=False,
                                                        start_method="spawn")
        _join(context, folder, processes, timeout)
        result = torch.load(folder / "result.pt", weights_only=True)
    state = result["state"]
    if set(state) - set(model.state_dict()):  # LSQ made the steps learnable parameters in the processes
        from zerobit.train.finetune import _learn_steps

        _learn_steps(model)
    model.load_state_dict(state)
    model.eval()
    return result["history"]


def _run_rank(rank: int, processes: int, port: int, backend: str, threads: int, folder: str) -> None:
    """One spawned process: join the group, fine-tune its shard of every batch; rank 0 writes the result."""
    from zerobit.train.finetune import finetune

    out = Path(folder)
    try:
        torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes)
        try:
            job = _load_job(out / "job.pt")
            device = job["device"]
            if backend == "nccl":
                device = torch.device("cuda", rank)
                torch.cuda.set_device(device)
            model = job["model"].to(device)
            teacher = job["teacher"].to(device) if job["teacher"] is not None else None
            history = finetune(model, job["data"], job["config"], teacher=teacher, progress=job["progress"],
                               epochs=job["epochs"], steps=job["steps"], task=job["task"])
            if rank == 0:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                torch.save({"state": state, "history": history}, out / "result.tmp")
                os.replace(out / "result.tmp", out / "result.pt")
            dist.barrier()  # every rank has trained to the end and rank 0's result is written
            (out / f"finished-{rank}").touch()
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"error-{rank}.txt").write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise


def _join(context: Any, folder: Path, processes: int, timeout: float | None) -> None:
    """Wait for the processes; a failure becomes a RuntimeError naming the rank that failed first. A process that
    fails after every rank finished training and the result was written (`finished-RANK`) loses nothing."""
    from torch.multiprocessing.spawn import ProcessException

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if deadline is not None and time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                for p in context.processes:
                    p.join()
                raise TimeoutError(f"the {processes} fine-tune processes did not finish within {timeout:g} s")
    except ProcessException as exc:
        if (folder / f"finished-{exc.error_index}").exists() and (folder / "result.pt").exists():
            return  # it crashed while shutting down (gloo's threads at exit, seen on CI), after the work was done
        first = _first_error(folder)
        rank, text = first if first is not None else (exc.error_index, str(exc))
        raise RuntimeError(f"fine-tune process of rank {rank} (of {processes}) failed:\n{text}") from None


def _first_error(folder: Path) -> tuple[int, str] | None:
    """(rank, traceback) of the earliest error a process recorded (others may fail because it did)."""
    found = []
    for path in folder.glob("error-*.txt"):
        stamp, _, text = path.read_text().partition("\n")
        found.append((float(stamp), int(path.stem.split("-")[1]), text))
    if not found:
        return None
    _, rank, text = min(found)
    return rank, text


def _load_job(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(f"a fine-tune process could not rebuild the model, teacher, data or task ({exc}): their "
                           "classes and functions must be importable, defined at module level (not inside a "
                           "function or under if __name__ == '__main__')") from exc


def _save_job(job: dict, path: Path) -> None:
    try:
        torch.save(job, path)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ValueError(f"fine-tuning in several processes sends the model, teacher, data and task to them by "
                         f"pickling, which failed ({exc}); define their classes and functions at module level, "
                         "or run your script under torchrun (see zerobit.train.distributed)") from exc


def _backend(model: nn.Module, processes: int, backend: str | None) -> str:
    device = model_device(model)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if backend is None:
        return "nccl" if gpus >= processes and dist.is_nccl_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "nccl" and gpus < processes:
        raise ValueError(f"the nccl backend needs the model on CUDA and a GPU per process ({processes}); this "
                         f"model is on {device} and {gpus} GPU(s) are usable: use backend='gloo'")
    return backend


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
