"""OPQ: one-shot analytic pruning + quantization allocation from the pretrained weights alone (seed 003).

Every layer's weights are modelled as Laplace with scale b = mean|W|. Pruning the fraction p (threshold
t = −b·ln(1−p), τ = t/b) costs b²[2 − e^{−τ}(τ² + 2τ + 2)] of squared error per weight; quantizing the survivors
to `bits` costs (1−p)·Δ²/12 with step Δ = α_bits·b/(2^(bits−1)−1), α_bits the Laplace-optimal clipping range
*(reconstructed: the paper does not publish its step rule; we use the known MSE-optimal clips for Laplace)*.

Normalization (the issue's "not one global threshold"): each layer's error is divided by its weight energy
E[w²] = 2b², so a layer of small weights is not pruned away just because its absolute errors are small. The
allocation minimizes Σ_l n_l·(relative error per weight)_l + λ·cost_l over a grid of (p, bits) per layer — bits
shared by coupled layers, as the Policy requires — and a bisection on λ finds the allocation that just fits the
budget, checked with the exact file size; a greedy fill then spends what the bisection's discrete jumps left
unused (best Δerror/Δcost step that still fits, until none does). No search loop, no data.

Unified channel-wise quantization: the channels of a layer share one grid of 2^(b−1)−1 levels after a
per-channel rescale. zerobit folds each BatchNorm into that per-channel float16 factor, so the rescale costs no
extra bytes: the file stores it once per channel either way, and never a second per-channel table.

Fine-tuning afterwards keeps the masks and the steps frozen; weights are quantized in the forward pass (STE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from zerobit.budget import BOPs, BudgetError, Latency, MACs
from zerobit.data.loaders import batches_of
from zerobit.export.layout import LayerLayout
from zerobit.policy import GroupDecision, LayerDecision, Policy
from zerobit.quant.apply import apply_policy, drop_empty_channels, quant_layers
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy
from zerobit.train.calibrate import recalibrate_batchnorm

# MSE-optimal clipping range of a Laplace(b) source, in units of b, by bit-width (2^b levels).
LAPLACE_CLIP = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 8: 9.89}
OPQ_BITS = (2, 3, 4, 5, 6, 8)
OPQ_SPARSITY = tuple(round(0.05 * i, 2) for i in range(20))  # 0 … 0.95


def pruning_error(p: np.ndarray) -> np.ndarray:
    """Squared error per weight, in units of b², of zeroing the fraction p of smallest Laplace weights."""
    tau = -np.log1p(-p)
    return 2 - np.exp(-tau) * (tau**2 + 2 * tau + 2)


def quantization_error(p: np.ndarray, bits: int) -> np.ndarray:
    """Squared error per weight, in units of b², of a uniform grid on the surviving (1−p) weights."""
    step = LAPLACE_CLIP[bits] / (2 ** (bits - 1) - 1)
    return (1 - p) * step**2 / 12


def relative_error_table() -> np.ndarray:
    """(len(OPQ_SPARSITY), len(OPQ_BITS)) error per weight relative to E[w²] = 2b² (the same for every layer)."""
    p = np.array(OPQ_SPARSITY)
    return np.stack([(pruning_error(p) + quantization_error(p, b)) / 2 for b in OPQ_BITS], axis=1)


@register_strategy
@dataclass(frozen=True)
class OPQ(Strategy):
    """One-shot Laplace-model allocation of per-layer sparsity and per-group bits; see the module docstring.

    Example:
        >>> # zerobit.compress(model, x, budget=Size(fraction=1/64), strategy="opq", ...)
    """

    max_sparsity: float = 0.95
    freeze_steps: bool = True
    name = "opq"

    def _layer_costs(self, problem: Problem, sparsities: tuple[float, ...]) -> dict[str, np.ndarray]:
        """Cost of each layer at each (sparsity, bits): file bits, or BOPs, as the budget counts."""
        costs = {}
        for name, layer in problem.graph.layers.items():
            table = np.zeros((len(sparsities), len(OPQ_BITS)))
            for j, bits in enumerate(OPQ_BITS):
                for i, p in enumerate(sparsities):
                    if isinstance(problem.budget, BOPs):
                        table[i, j] = layer.macs * bits * problem.act_bits
                    elif layer.shares:  # a tied weight is stored once, with the layer that owns it
                        table[i, j] = 0.0
                    else:
                        lay = LayerLayout(name, [bits] * layer.out_channels, layer.weights_per_channel, False, p)
                        table[i, j] = 8 * (lay.code_bytes + lay.position_bytes)
            costs[name] = table
        return costs

    def allocate(self, problem: Problem, lam: float, costs: dict[str, np.ndarray],
                 sparsities: tuple[float, ...]) -> Policy:
        """The policy minimizing Σ relative error + λ·cost (bits per group, sparsity per layer)."""
        error = relative_error_table()[: len(sparsities)]
        p_idx, b_idx = {}, {}
        for gname, group in problem.graph.groups.items():
            totals = np.zeros(len(OPQ_BITS))
            best_p = {}
            for lname in group.layers:
                score = error + lam * costs[lname] / max(1, problem.graph.layers[lname].params)
                best_p[lname] = score.argmin(axis=0)
                totals += score.min(axis=0)
            b_idx[gname] = j = int(totals.argmin())
            p_idx |= {lname: int(best_p[lname][j]) for lname in group.layers}
        return self._policy(problem, p_idx, b_idx, sparsities)

    def fill(self, problem: Problem, policy: Policy, costs: dict[str, np.ndarray],
             sparsities: tuple[float, ...]) -> Policy:
        """Spend what the bisection left: take the best Δerror/Δcost step (one sparsity step less in a layer, or
        one bit level more in a group) that still fits, until none does."""
        error = relative_error_table()[: len(sparsities)]
        graph = problem.graph
        p_idx = {n: int(np.abs(np.array(sparsities) - policy.layer(n).sparsity).argmin()) for n in graph.layers}
        b_idx = {n: OPQ_BITS.index(d.bits[0]) for n, d in policy.groups.items()}
        group_of = {n: layer.out_group for n, layer in graph.layers.items()}

        def step_gain(layers: list[str], dp: int, db: int) -> tuple[float, float]:
            gain = cost = 0.0
            for n in layers:
                i, j = p_idx[n], b_idx[group_of[n]]
                gain += graph.layers[n].params * (error[i, j] - error[i + dp, j + db])
                cost += costs[n][i + dp, j + db] - costs[n][i, j]
            return gain, cost

        while True:
            moves = [(*step_gain([n], -1, 0), n, None) for n in p_idx if p_idx[n] > 0]
            moves += [(*step_gain(list(g.layers), 0, 1), None, name) for name, g in graph.groups.items()
                      if b_idx[name] < len(OPQ_BITS) - 1]
            moves.sort(key=lambda m: m[0] / max(m[1], 1e-9), reverse=True)
            for _gain, _cost, layer, group in moves:
                trial_p, trial_b = dict(p_idx), dict(b_idx)
                if layer is not None:
                    trial_p[layer] -= 1
                else:
                    trial_b[group] += 1
                candidate = self._policy(problem, trial_p, trial_b, sparsities)
                if problem.fits(candidate):
                    p_idx, b_idx, policy = trial_p, trial_b, candidate
                    break
            else:
                return policy

    @staticmethod
    def _policy(problem: Problem, p_idx: dict[str, int], b_idx: dict[str, int],
                sparsities: tuple[float, ...]) -> Policy:
        groups = {n: GroupDecision((OPQ_BITS[b_idx[n]],) * g.channels) for n, g in problem.graph.groups.items()}
        return Policy(groups, problem.act_bits, layers={n: LayerDecision(sparsities[i]) for n, i in p_idx.items()})

    def search(self, problem: Problem) -> SearchResult:
        start = time.perf_counter()
        if isinstance(problem.budget, (MACs, Latency)):
            raise BudgetError("OPQ zeroes single weights, which reduces neither MACs nor latency; use a Size or "
                              "BOPs budget, or a channel-pruning strategy (uniform, sequential, ajpq)")
        sparsities = tuple(p for p in OPQ_SPARSITY if p <= self.max_sparsity)
        costs = self._layer_costs(problem, sparsities)
        cheapest = self.allocate(problem, 1e9, costs, sparsities)
        if not problem.fits(cheapest):
            raise BudgetError(f"OPQ cannot meet {problem.limit:,.0f} {problem.budget.unit}: its smallest "
                              f"allocation costs {problem.cost(cheapest):,.0f} (raise max_sparsity or the budget)")
        lo, hi = math.log(1e-9), math.log(1e9)  # fits at hi; bisection towards the least compression that fits
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if problem.fits(self.allocate(problem, math.exp(mid), costs, sparsities)) else (mid, hi)
        policy = self.fill(problem, self.allocate(problem, math.exp(hi), costs, sparsities), costs, sparsities)
        emptied, start_model = drop_empty_channels(problem.model, problem.graph, policy, problem.example_inputs)
        if problem.fits(emptied):  # channels zeroed in every coupled layer leave the model for real
            policy = emptied
        else:
            start_model = problem.model
        seconds = time.perf_counter() - start
        model = apply_policy(start_model, problem.graph, policy, problem.example_inputs)
        recalibrate_batchnorm(model, batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed),
                              task=problem.task)
        if self.freeze_steps:
            for q in quant_layers(model).values():
                q.freeze_scales()
        return SearchResult(policy, model, info={"allocation_seconds": seconds, "lambda": math.exp(hi)})

