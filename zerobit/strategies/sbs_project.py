"""Projection of SBS's frozen gates onto the budget: the final policy always fits, and uses the budget.

Each gate's margin (how far its statistic is above its threshold, in units of its temperature) says how firmly
training wanted it open. While the policy is over the budget, the open decision with the smallest margin per
unit of cost saved is closed (a group's weight width or a layer's input width one step down the chain, or a
group's weakest kept block of channels removed). Then, while some closed decision fits, the one nearest to
opening per unit of cost is opened again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from zerobit.budget import BudgetError, amount
from zerobit.policy import GroupDecision, Policy
from zerobit.strategies.base import Problem

MAX_MOVES = 5000


@dataclass
class Margins:
    """Gate margins in temperature units (positive = open) and which block each channel of a group follows."""

    chain: tuple[int, ...]
    act_chain: tuple[int, ...]
    weight: dict[str, list[float]]  # group → one per wider weight width
    channel: dict[str, torch.Tensor]  # prunable group → one per block of channels
    act: dict[str, list[float]]  # layer → one per wider input width
    blocks: dict[str, torch.Tensor | list[int]]  # group → block of each channel
    floor: dict[str, int] = field(default_factory=dict)  # group → blocks kept unless the budget forces fewer


@dataclass
class _State:
    wbits: dict[str, int]
    abits: dict[str, int]
    kept: dict[str, set[int]]  # group → kept blocks
    moves: int = field(default=0)


def _policy(problem: Problem, m: Margins, s: _State, meta: dict) -> Policy:
    groups = {g: GroupDecision(tuple(s.wbits[g] if b in s.kept[g] else 0 for b in m.blocks[g]))
              for g in problem.graph.groups}
    return Policy(groups, problem.act_bits, meta, act=dict(s.abits))


Move = tuple[str, str, int]  # ("w", group, bits) | ("a", layer, bits) | ("-" or "+", group, block)


def _moves(problem: Problem, m: Margins, s: _State, down: bool, floors: bool) -> list[tuple[float, Move]]:
    """(margin, move) for every one-step change of the state in one direction (down = cheaper)."""
    out: list[tuple[float, Move]] = []

    def width(kind: str, key: str, now: int, chain: tuple[int, ...], margins: list[float]) -> None:
        i = chain.index(now)
        j = i - 1 if down else i + 1
        if 0 <= j < len(chain):
            out.append((margins[max(i, j) - 1], (kind, key, chain[j])))  # the gate of the wider of the two

    for g in problem.graph.groups:
        width("w", g, s.wbits[g], m.chain, m.weight[g])
        if g in m.channel:
            margins, kept = m.channel[g], s.kept[g]
            pool = sorted(kept) if down else sorted(set(range(len(margins))) - kept)
            least = m.floor.get(g, 1) if floors else 1
            if pool and (not down or len(kept) > least):
                pick = (min if down else max)(pool, key=lambda b: float(margins[b]))
                out.append((float(margins[pick]), ("-" if down else "+", g, pick)))
    for n, bits in s.abits.items():
        width("a", n, bits, m.act_chain, m.act[n])
    return out


def _apply(s: _State, move: Move) -> _State:
    kind, key, value = move
    new = _State(dict(s.wbits), dict(s.abits), {g: set(k) for g, k in s.kept.items()}, s.moves + 1)
    if kind == "w":
        new.wbits[key] = value
    elif kind == "a":
        new.abits[key] = value
    elif kind == "-":
        new.kept[key].discard(value)
    else:
        new.kept[key].add(value)
    return new


def _step(problem: Problem, m: Margins, s: _State, down: bool, meta: dict, floors: bool = True) -> _State | None:
    """The best single move, or None. Down, where no move saves anything (a latency table is flat between some
    channel counts), the least firmly held cost-neutral move, so that the next ones can."""
    now, limit, best, neutral = problem.cost(_policy(problem, m, s, meta)), problem.limit, None, None
    for margin, move in _moves(problem, m, s, down, floors):
        trial = _apply(s, move)
        cost = problem.cost(_policy(problem, m, trial, meta))
        change = now - cost if down else cost - now
        if down and change == 0 and (neutral is None or margin < neutral[0]):
            neutral = (margin, trial)
        if change <= 0 or (not down and cost > limit):
            continue
        # down: close what training held least firmly per cost saved; up: open what was nearest to opening
        score = (max(margin, 0.0) + 0.5) / change if down else change * (max(-margin, 0.0) + 0.5)
        if best is None or score < best[0]:
            best = (score, trial)
    return best[1] if best is not None else neutral[1] if neutral is not None else None


def project(problem: Problem, found: Policy, margins: Margins) -> Policy:
    """`found` changed as little as the gates' margins say until it fits the budget, then filled up to it."""
    meta = dict(found.meta)
    # plain ints: the policy is rebuilt for every trial move, and iterating a tensor element by element is slow
    margins = replace(margins, blocks={g: [int(b) for b in t.tolist()] for g, t in margins.blocks.items()})
    kept = {g: {int(margins.blocks[g][c]) for c, b in enumerate(found[g].bits) if b > 0} for g in margins.blocks}
    wbits = {g: max(found[g].kept_bits()) for g in found.groups}
    s = _State(wbits, {n: found.act_of(n) for n in margins.act}, kept)
    while problem.cost(_policy(problem, margins, s, meta)) > problem.limit:
        nxt = _step(problem, margins, s, True, meta) or _step(problem, margins, s, True, meta, floors=False)
        if nxt is None or nxt.moves > MAX_MOVES:
            raise BudgetError(f"SBS could not bring its policy under {amount(problem.limit)} {problem.budget.unit}")
        s = nxt
    while s.moves <= MAX_MOVES and (nxt := _step(problem, margins, s, False, meta)) is not None:
        s = nxt
    policy = _policy(problem, margins, s, meta | {"projection_moves": s.moves})
    policy.validate(problem.graph)
    return policy
