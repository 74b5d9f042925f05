"""AJPQ: hierarchical reinforcement learning over layer sparsity and channel bit-widths (seeds 000, 001).

One importance ranking per coupled group (L1 magnitude by default; Group Fisher is a drop-in). The agent walks
the groups in graph order; at each it takes two actions in [0, 1]:

- layer controller: sparsity s = a₀ · max_sparsity — the ⌈s·C⌉ lowest-ranked channels get 0 bits;
- channel controller *(reconstructed design)*: a₁ picks a bit level b = round(b_min − 0.5 + a₁·levels); the
  surviving channels, ranked by the same importance, are cut into chunks of `chunk` channels; the top third of
  chunks gets one level more, the bottom third one level less — more important channels, more bits.

A DDPG agent (zerobit.strategies.ddpg) learns from the episode reward 0.1·(acc − acc_ref), accuracy in % on a
fixed slice of the validation split after a cheap recovery (zerobit.strategies.proxy): the policy is applied for
real (pruned channels removed) and its BatchNorm statistics re-estimated on a few training batches — on ResNet-20
this ranks random 1/32 policies by their fine-tuned accuracy with Spearman ρ ≈ 0.7–0.8 (bench/ajpq_proxy.py);
where the CPU has native bfloat16 it runs under bfloat16 autocast (ProxyConfig.precision), ~1.6× faster. The
budget is a wall, not a penalty: each action is capped so that the remaining groups, at their minimum (max
sparsity, lowest bits), can still meet it — so every episode's policy fits. The `rerank` best distinct policies
are scored again at the end by the same proxy on ≥ 2,000 images (or by `final`) and the best is returned (the
top one of hundreds of noisy rewards is partly luck; bench/ajpq_rerank.py fine-tunes a search's leaders). The search
state (agent, replay, RNG, history, leaders) is saved after every episode and an interrupted search resumes
where it stopped; seeded runs repeat exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from zerobit.device import model_device
from zerobit.parallel import ScorePool
from zerobit.policy import GroupDecision, Policy, aligned_count, aligns, repeat, tied_scores
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy
from zerobit.strategies.ddpg import DDPG, DDPGConfig
from zerobit.strategies.proxy import ProxyConfig, ProxyReference, proxy_reference, proxy_reward, proxy_scores


@dataclass(frozen=True)
class ActionSpace:
    """What the agent may decide. prune=False → quantize-only (HAQ-like); quantize=False → prune-only (AMC-like)."""

    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    max_sparsity: float = 0.8
    chunk: int = 8
    prune: bool = True
    quantize: bool = True
    fixed_bits: int = 8  # bits of every kept channel when quantize=False


def group_decision(scores: torch.Tensor, sparsity: float, level: int, space: ActionSpace,
                   prunable: bool, multiple: int = 1) -> GroupDecision:
    """Channel bits of one group from the two actions (see the module docstring); the kept count rounded down
    by `aligned_count` to a multiple of `multiple`."""
    channels = len(scores)
    removed = min(channels - 1, int(np.ceil(sparsity * channels))) if prunable and space.prune else 0
    removed = channels - aligned_count(channels - removed, channels, multiple)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    bits = [0] * channels
    kept = order[: channels - removed]
    chunks = [kept[i:i + space.chunk] for i in range(0, len(kept), space.chunk)]
    for k, chunk in enumerate(chunks):
        shift = 1 if k < len(chunks) / 3 else (-1 if k >= 2 * len(chunks) / 3 and len(chunks) > 2 else 0)
        lvl = min(len(space.bits) - 1, max(0, level + shift)) if space.quantize else None
        for c in chunk:
            bits[c] = space.bits[lvl] if lvl is not None else space.fixed_bits
    return GroupDecision(tuple(bits))


class _Episode:
    """Builds one policy group by group under the budget wall."""

    def __init__(self, problem: Problem, space: ActionSpace) -> None:
        self.problem, self.space = problem, space
        self.names = list(problem.graph.groups)
        self.minimum = {n: self._decision(n, space.max_sparsity, 0) for n in self.names}
        self.decisions: dict[str, GroupDecision] = {}

    def _decision(self, name: str, sparsity: float, level: int) -> GroupDecision:
        g = self.problem.graph.groups[name]
        multiple = self.problem.channel_multiple if aligns(g, self.problem.channel_multiple) else 1
        return repeat(group_decision(tied_scores(self.problem.scores[name], g.tie, g.span), sparsity, level,
                                     self.space, g.prunable, multiple), g.tie, g.span)

    def policy(self, extra: dict[str, GroupDecision] | None = None) -> Policy:
        groups = self.minimum | self.decisions | (extra or {})
        return Policy({n: groups[n] for n in self.names}, self.problem.act_bits)

    def feasible(self, name: str, sparsity: float, level: int) -> bool:
        return self.problem.fits(self.policy({name: self._decision(name, sparsity, level)}))

    def step(self, name: str, sparsity: float, level: int) -> tuple[float, int]:
        """Apply the wall: lower the bit level, then raise sparsity, until the rest can still fit."""
        max_s = self.space.max_sparsity if self.space.prune else 0.0
        for lvl in range(level, -1, -1):
            if self.feasible(name, sparsity, lvl):
                break
            if self.feasible(name, max_s, lvl):
                lo, hi = sparsity, max_s
                for _ in range(6):
                    mid = (lo + hi) / 2
                    lo, hi = (lo, mid) if self.feasible(name, mid, lvl) else (mid, hi)
                sparsity = hi
                break
        else:
            lvl, sparsity = 0, max_s
        self.decisions[name] = self._decision(name, sparsity, lvl)
        return sparsity, lvl


def score_policy(context: tuple, item: tuple[dict, int]) -> float:
    """The proxy reward of one episode's policy: `context` = (problem, reference, proxy config), `item` =
    (policy dict, seed). Module-level so that Ray actors can run it."""
    problem, reference, proxy = context
    policy, seed = item
    scores = proxy_scores(problem, reference, Policy.from_dict(policy), proxy, seed)
    return proxy_reward(scores, reference, proxy.metric)


def _keep_top(top: list, reward: float, policy: dict, k: int) -> None:
    """Keep the k best distinct policies seen, best first, as [reward, policy dict] pairs."""
    for entry in top:
        if entry[1] == policy:
            entry[0] = max(entry[0], reward)
            break
    else:
        top.append([reward, policy])
    top.sort(key=lambda e: -e[0])
    del top[max(k, 1):]


def _static_features(problem: Problem) -> np.ndarray:
    """Per group: index, type, c_in, c_out, stride, kernel, params, feature-map area (min-max normalized)."""
    rows = []
    for i, g in enumerate(problem.graph.groups.values()):
        first = problem.graph.layers[g.layers[0]]
        kind = {"conv": 0.0, "depthwise": 1.0, "linear": 0.5, "embedding": 0.75}[first.kind]
        params = sum(problem.graph.layers[n].params for n in g.layers)
        rows.append([i, kind, first.in_features, g.channels, first.stride, first.kernel_area, params,
                     first.out_area])
    feats = np.array(rows, dtype=np.float32)
    span = feats.max(0) - feats.min(0)
    return (feats - feats.min(0)) / np.where(span > 0, span, 1)


@register_strategy
@dataclass(frozen=True)
class AJPQ(Strategy):
    """Hierarchical RL search of per-group sparsity and per-channel-chunk bits; see the module docstring.

    Example:
        >>> # zerobit.compress(model, x, Size(fraction=1/32), AJPQ(episodes=300, checkpoint="ajpq.state"), ...)
    """

    episodes: int = 300
    warmup: int = 30
    space: ActionSpace = field(default_factory=ActionSpace)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    agent: DDPGConfig = field(default_factory=DDPGConfig)
    rerank: int = 5  # leaders re-scored at the end (< 2: return the best search reward)
    final: ProxyConfig | None = None  # the re-rank's proxy; None: the search's proxy on ≥ 2,000 images
    checkpoint: str | None = None
    seed: int = 0
    workers: int = 1  # K: policies proposed per batch and scored in parallel on K Ray actors (1: here, in order)
    ray_address: str | None = None  # a Ray cluster for the scorers ("auto", "HOST:PORT"); None: a local one
    name = "ajpq"

    def search(self, problem: Problem) -> SearchResult:
        feats = _static_features(problem)
        agent = DDPG(feats.shape[1] + 4, 2, self.agent, self.seed)
        agent.anneal_over(self.episodes - self.warmup)
        state = {"episode": 0, "best_reward": None, "best_policy": None, "rewards": [], "top": []}
        if self.checkpoint and os.path.exists(self.checkpoint):
            state = self._load(agent, problem)
            state.setdefault("top", [])
        reference = proxy_reference(problem, self.proxy, self.seed)
        bar = tqdm(total=self.episodes, initial=state["episode"], desc="ajpq", disable=not problem.progress)
        context = (replace(problem, progress=False), reference, self.proxy)
        with ScorePool(score_policy, context, self.workers, self.ray_address) as pool:
            while state["episode"] < self.episodes:
                batch = [(ep, ep < self.warmup, *self._episode(problem, agent, feats, ep < self.warmup))
                         for ep in range(state["episode"], min(state["episode"] + self.workers, self.episodes))]
                rewards = pool.map([(policy.to_dict(), self.seed + ep) for ep, _, policy, _, _ in batch])
                for (ep, warm, policy, states, actions), reward in zip(batch, rewards, strict=True):
                    self._learn(agent, state, ep, warm, policy, states, actions, reward)
                    if self.checkpoint:
                        self._save(agent, state, problem)
                    bar.update(1)
                    bar.set_postfix(best=f"{state['best_reward']:.2f}",
                                    budget=f"{problem.cost(policy) / problem.limit:.0%}")
            bar.close()
            best, final = self._rerank(problem, state, reference, pool)
        dtype = self.proxy.dtype(model_device(problem.model))
        return SearchResult(best, info={"episodes": state["episode"], "best_reward": state["best_reward"],
                                        "rewards": state["rewards"], "reference_accuracy": reference.accuracy,
                                        "proxy_dtype": str(dtype).removeprefix("torch."), "rerank": final})

    def _learn(self, agent: DDPG, state: dict, ep: int, warm: bool, policy: Policy, states: list[np.ndarray],
               actions: list[np.ndarray], reward: float) -> None:
        """Teach the agent one scored episode and record it in the search state."""
        agent.remember(states, actions, reward)
        if not warm:
            agent.update(steps=len(states))
        agent.end_episode(warm)
        state["rewards"].append(reward)
        stored = policy.to_dict()
        if state["best_reward"] is None or reward > state["best_reward"]:
            state["best_reward"], state["best_policy"] = reward, stored
        _keep_top(state["top"], reward, stored, self.rerank)
        state["episode"] = ep + 1

    def _episode(self, problem: Problem, agent: DDPG, feats: np.ndarray,
                 warm: bool) -> tuple[Policy, list[np.ndarray], list[np.ndarray]]:
        """One walk over the groups: the agent's actions, capped by the budget wall."""
        total_cost = problem.budget.reference(problem.graph)
        episode, states, actions, prev = _Episode(problem, self.space), [], [], np.zeros(2, np.float32)
        levels = len(self.space.bits)
        for i, name in enumerate(problem.graph.groups):
            cost = problem.cost(episode.policy())
            s = np.concatenate([feats[i], [1 - cost / total_cost, cost / total_cost], prev]).astype(np.float32)
            a = agent.act(s, explore=True, warmup=warm)
            level = int(np.clip(round(-0.5 + a[1] * levels), 0, levels - 1))
            sparsity, level = episode.step(name, float(a[0]) * self.space.max_sparsity, level)
            prev = np.array([sparsity / self.space.max_sparsity, (level + 0.5) / levels], np.float32)
            states.append(s)
            actions.append(prev)
        return episode.policy(), states, actions

    def _rerank(self, problem: Problem, state: dict, search_ref: ProxyReference,
                pool: ScorePool) -> tuple[Policy, list[dict]]:
        """Score the `rerank` best distinct policies again with the `final` proxy; return the best of them.

        The search's best proxy reward is the maximum of many noisy scores, so it tends to belong to a policy
        that was merely lucky on its slice and batches; a larger, fixed evaluation of the few leaders corrects it.
        """
        leaders = [(reward, Policy.from_dict(p)) for reward, p in state["top"]]
        if self.rerank < 2 or len(leaders) < 2:
            return Policy.from_dict(state["best_policy"]), []
        config = self.final or replace(self.proxy, samples=max(2000, self.proxy.samples))
        reference = proxy_reference(problem, config, self.seed, ranges=search_ref.ranges)
        pool.set_context((replace(problem, progress=False), reference, config))
        rewards = pool.map([(policy.to_dict(), self.seed) for _, policy in leaders])
        final = [{"search_reward": reward, "final_reward": again, "cost": problem.cost(policy)}
                 for (reward, policy), again in zip(leaders, rewards, strict=True)]
        pick = max(range(len(leaders)), key=lambda i: final[i]["final_reward"])
        return leaders[pick][1], final

    def _save(self, agent: DDPG, state: dict, problem: Problem) -> None:
        meta = {"state": json.dumps(state), "agent": json.dumps(agent.scalars()),
                "config": json.dumps(asdict(self)), "problem": json.dumps(problem.identity())}
        tmp = f"{self.checkpoint}.tmp"
        save_file(agent.tensors(), tmp, metadata=meta)
        os.replace(tmp, self.checkpoint)

    def _load(self, agent: DDPG, problem: Problem) -> dict:
        from safetensors import safe_open

        with safe_open(self.checkpoint, "pt") as f:
            meta = f.metadata()
        saved = json.loads(meta["config"])
        mine = json.loads(json.dumps(asdict(self)))
        free = ("episodes", "workers", "ray_address")  # a search may go on longer, or on other scorers
        if {k: v for k, v in saved.items() if k not in free} != {k: v for k, v in mine.items() if k not in free}:
            raise ValueError(f"{self.checkpoint} belongs to a search with other settings; delete it or use "
                             "another checkpoint path")
        if "problem" in meta and json.loads(meta["problem"]) != json.loads(json.dumps(problem.identity())):
            raise ValueError(f"{self.checkpoint} belongs to a search of another model or budget "
                             f"({json.loads(meta['problem'])['budget']}); delete it or use another checkpoint path")
        agent.restore(load_file(self.checkpoint), json.loads(meta["agent"]))
        return json.loads(meta["state"])
