"""Ray, the one place: connecting to a cluster and a pool of workers that score many candidates in parallel.

Ray is optional (``pip install zerobit[ray]``). Every user of this module runs without it: with one worker, or
with no Ray installed and no cluster named, the work runs here, in this process, in order.

Example:
    >>> # def score(context, item): ...   (module level, so that Ray can send it)
    >>> # with ScorePool(score, context, workers=2) as pool:  # 2 Ray actors, each holding `context` once
    >>> #     pool.map([a, b])  # == [score(context, a), score(context, b)], computed on the actors
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

RAY_HINT = "pip install 'zerobit[ray]' (or pip install ray)"


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to; "HOST:PORT": a head node), or
    start a local one with `num_cpus` CPUs (default: all cores) when `address` is None. Returns the ray module."""
    if not ray_installed():
        raise ImportError(f"Ray is not installed; {RAY_HINT}, or run without a Ray address")
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def cluster_cpus() -> float:
    """CPUs of the connected Ray cluster."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


class _Worker:
    """A Ray actor holding the shared context once; runs `fn(context, item)` for each item it is sent."""

    def __init__(self, context: Any, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.context = context

    def run(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
        return fn(self.context, item)

    def set_context(self, context: Any) -> None:
        self.context = context


class ScorePool:
    """`map(items)` returns ``[fn(context, item) for item in items]``, in order.

    With `workers` = 1 it runs here (identical to a plain loop). With more, `workers` Ray actors (each with
    `cpus_per_worker` CPUs and `gpus_per_worker` GPUs) receive `context` once and take the items in turn; Ray is
    started locally unless `address` names a cluster. `fn` must be importable (a module-level function).
    """

    def __init__(self, fn: Callable[[Any, Any], Any], context: Any, workers: int = 1, address: str | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {workers}")
        self.fn, self.context, self.workers, self.actors = fn, context, workers, []
        if workers == 1:
            return
        ray = connect(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        shared = ray.put(context)
        self.actors = [remote.remote(shared, int(max(1, cpus_per_worker))) for _ in range(workers)]

    def map(self, items: Sequence[Any]) -> list[Any]:
        if not self.actors:
            return [self.fn(self.context, item) for item in items]
        import ray

        futures = [self.actors[i % len(self.actors)].run.remote(self.fn, item) for i, item in enumerate(items)]
        return ray.get(futures)

    def set_context(self, context: Any) -> None:
        """Give every worker a new shared context (sent once to each)."""
        self.context = context
        if self.actors:
            import ray

            shared = ray.put(context)
            ray.get([actor.set_context.remote(shared) for actor in self.actors])

    def close(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []

    def __enter__(self) -> ScorePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
