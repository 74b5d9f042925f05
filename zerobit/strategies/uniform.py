"""Uniform baseline: one keep-ratio and one bit-width for every group."""

from __future__ import annotations

from dataclasses import dataclass

from zerobit.budget import BudgetError, amount
from zerobit.graph.emptying import groups_to_empty, name_list
from zerobit.policy import Policy, fill_aligned, uniform_policy
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy

UNIFORM_BITS = (8, 6, 5, 4, 3, 2)


def max_keep(problem: Problem, bits: int, iterations: int = 24, empty: tuple[str, ...] = ()) -> float | None:
    """Largest keep-ratio at which the uniform policy with `bits` (and the groups `empty` removed whole) fits the
    budget (None if none does)."""
    def policy(keep: float) -> Policy:
        return uniform_policy(problem.graph, problem.scores, keep, bits, problem.act_bits, problem.channel_multiple,
                              empty)

    if problem.fits(policy(1.0)):
        return 1.0
    if not problem.fits(policy(0.0)):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if problem.fits(policy(mid)) else (lo, mid)
    return lo


def final_uniform(problem: Problem, keep: float, bits: int, empty: tuple[str, ...] = ()) -> Policy:
    """The uniform policy at `keep` and `bits` (the groups `empty` removed whole); with `channel_multiple` > 1,
    what rounding the widths down left of the budget goes to the groups that lost most (`fill_aligned`)."""
    policy = uniform_policy(problem.graph, problem.scores, keep, bits, problem.act_bits, problem.channel_multiple,
                            empty)
    if problem.channel_multiple == 1:
        return policy
    targets = {n: keep * g.block for n, g in problem.graph.groups.items() if n not in empty}
    return fill_aligned(problem.graph, policy, problem.scores, problem.channel_multiple, targets, problem.fits)


def solve_uniform(problem: Problem, bits: int | None, min_keep: float,
                  empty: tuple[str, ...] = ()) -> tuple[float, int]:
    """(keep, bits): the highest bit-width whose keep-ratio is ≥ min_keep, else the one keeping most channels."""
    options = [(b, max_keep(problem, b, empty=empty)) for b in ([bits] if bits else UNIFORM_BITS)]
    options = [(b, k) for b, k in options if k is not None]
    if not options:
        aligned = (f" with kept channels rounded to multiples of {problem.channel_multiple} (channel_multiple)"
                   if problem.channel_multiple > 1 else "")
        raise BudgetError(f"no uniform policy meets the budget ({amount(problem.limit)} {problem.budget.unit}){aligned}")
    for b, k in options:
        if k >= min_keep:
            return k, b
    b, k = max(options, key=lambda o: (o[1], o[0]))
    return k, b


@register_strategy
@dataclass(frozen=True)
class Uniform(Strategy):
    """Same keep-ratio and bits everywhere: the least pruning that meets the budget at the chosen bits.

    Bits, unless fixed, are the highest of 8, 6, 5, 4, 3, 2 that still keeps at least `min_keep` of the
    channels (otherwise the width keeping the most). The lowest-importance channels are removed.

    `empty`: groups removed whole first — residual branches or transformer MLPs (depth pruning: their layers
    leave the model, the file and the runtime), named by group or by a module holding them (``"layer1"``: every
    branch of that stage); `zerobit.analyse(model, x).summary()` lists the groups that can go.

    Example:
        >>> # zerobit.compress(model, x, budget=Size(fraction=1/32), strategy=Uniform(bits=4), ...)
        >>> # zerobit.compress(model, x, budget=Size(fraction=1/64), strategy=Uniform(empty=("layer1",)), ...)
    """

    bits: int | None = None
    min_keep: float = 0.7
    empty: tuple[str, ...] = ()
    name = "uniform"

    def __post_init__(self) -> None:  # --option empty=layer1.0.conv1,layer1.1.conv1
        object.__setattr__(self, "empty", name_list(self.empty))

    def search(self, problem: Problem) -> SearchResult:
        empty = tuple(groups_to_empty(problem.graph.groups, self.empty))
        keep, bits = solve_uniform(problem, self.bits, self.min_keep, empty)
        policy = final_uniform(problem, keep, bits, empty)
        return SearchResult(policy, info={"keep": keep, "bits": bits} | ({"emptied": list(empty)} if empty else {}))
