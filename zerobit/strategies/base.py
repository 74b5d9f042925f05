"""What every strategy receives (a Problem) and returns (a SearchResult), and the registry of strategies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zerobit.budget import Budget
from zerobit.graph import ModelGraph
from zerobit.policy import Policy
from zerobit.task import DEFAULT_TASK, Task
from zerobit.train.finetune import FinetuneConfig


@dataclass
class Problem:
    """Everything a strategy may use to choose a Policy.

    Strategies score candidates on `val_data` (held out of training), never on test data.
    """

    model: nn.Module
    graph: ModelGraph
    budget: Budget
    example_inputs: Any  # a tensor, a tuple or a dict of tensors (as the model is called)
    train_data: Iterable
    val_data: Iterable
    scores: dict[str, torch.Tensor]  # channel importance per group
    act_bits: int = 8
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    progress: bool = True
    task: Task = DEFAULT_TASK
    channel_multiple: int = 1  # kept channels per group rounded to a multiple of this (policy.aligned_count)

    @property
    def limit(self) -> float:
        return self.budget.limit(self.graph)

    def cost(self, policy: Policy) -> float:
        return self.budget.cost(self.graph, policy)

    def identity(self) -> dict:
        """What a search's checkpoint must match to be resumed besides its settings: the budget and the groups."""
        aligned = {"channel_multiple": self.channel_multiple} if self.channel_multiple > 1 else {}
        return {"budget": repr(self.budget), "limit": self.limit, **aligned,
                "groups": {n: g.channels for n, g in self.graph.groups.items()}}

    def fits(self, policy: Policy) -> bool:
        return self.cost(policy) <= self.limit


@dataclass
class SearchResult:
    """A strategy's answer.

    `model`: an applied (fake-quant), partly trained model to continue from; or `start_model`: float weights the
    policy is applied to instead of the original ones (e.g. after ADMM's training); or neither.
    `retarget`: answers the same problem under another budget of the same kind without searching again (SBS
    projects its trained gates anew), where a Latency budget must be tightened after measuring; None = search.
    `finetune_lr`: the final fine-tune's peak learning rate as a multiple of the configured one (a search that
    already trained the model may want it to start lower).
    """

    policy: Policy
    model: nn.Module | None = None
    finetune_epochs_used: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    start_model: nn.Module | None = None
    retarget: Callable[[Problem], SearchResult] | None = None
    finetune_lr: float = 1.0


class Strategy:
    """Base class: subclasses are frozen dataclasses (their config) with a `search` method."""

    name = ""

    def check_budget(self, budget: Budget) -> None:
        """Raise BudgetError when this strategy cannot serve this kind of budget (called before any work)."""

    def search(self, problem: Problem) -> SearchResult:
        raise NotImplementedError


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its `name` (CLI and `compress(strategy="name")`)."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is empty or already registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(strategy: str | Strategy, **config: Any) -> Strategy:
    """A strategy instance from its name (with config; "outer.inner" keys set fields of nested configs) or as given.

    Example:
        >>> get_strategy("uniform", bits=4).bits
        4
    """
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[strategy]
    known = {f.name: f for f in dataclasses.fields(cls)}
    flat = {k: v for k, v in config.items() if "." not in k}
    for key in sorted(k for k in config if "." in k):  # "proxy.metric=kl" sets a field of a nested config
        outer, inner = key.split(".", 1)
        part = known.get(outer)
        if part is None or part.default_factory is dataclasses.MISSING:
            raise ValueError(f"strategy {strategy!r} has no nested config {outer!r} (option {key!r})")
        base = flat.get(outer, part.default_factory())
        if inner not in {f.name for f in dataclasses.fields(base)}:
            raise ValueError(f"{type(base).__name__} has no option {inner!r} (option {key!r})")
        flat[outer] = dataclasses.replace(base, **{inner: config[key]})
    unknown = set(flat) - set(known)
    if unknown:
        raise ValueError(f"strategy {strategy!r} has no option {', '.join(sorted(unknown))}; "
                         f"options: {', '.join(known)}")
    return cls(**flat)
