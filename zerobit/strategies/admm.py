"""ADMM: min loss s.t. Σ bits · nonzeros ≤ budget, sparsity and bit-widths learned jointly (Yang et al., seed 004).

W are the network's weights (trained), V their sparse, codebook-quantized projection, U the scaled dual:

1. sparse projection of W + U: every weight scores w²/b_l (b_l its layer's bits); the longest prefix of the
   sorted scores whose bits fit the payload budget is kept. A kept weight costs b_l plus its share of the
   position code (1/density for a bitmap, or an index), so the projection pays for what the file will store;
2. quantization projection: per layer and bit-width, 1-D k-means on the kept values (zero stays an exact,
   fixed centroid: it is the pruned weight); one bit-width per coupled group chosen by a multiple-choice
   knapsack — start at 8 bits, lower the group with the least Δerror/Δbits until the payload fits;
3. W takes SGD steps on loss + ρ/2·Σ‖W − V + U‖² (with distillation, as every fine-tune here), then U ← U + W − V.

The result is unstructured zeros plus per-layer codebooks; the Policy records each layer's sparsity and its
codebook flag, the .zbit file stores codes of nonzeros, their positions and the centroids — all counted in its
bytes. Channels left with no weight in any layer of their group get 0 bits and are removed physically.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from zerobit.budget import Budget, BudgetError, Size, amount
from zerobit.export.layout import layer_layouts
from zerobit.policy import GroupDecision, LayerDecision, Policy, tied_scores
from zerobit.quant.apply import magnitude_mask
from zerobit.quant.codebook import codebook_error, kmeans_1d, nearest
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy
from zerobit.train.finetune import finetune

ADMM_BITS = (8, 6, 5, 4, 3, 2)


def _payload_overhead(problem: Problem, policy: Policy) -> float:
    """File bytes that are not codes, positions or codebooks (header, scales, biases) under `policy`."""
    payload = sum(lay.code_bytes + lay.position_bytes + 2 * lay.book_entries
                  for lay in layer_layouts(problem.graph, policy))
    return problem.cost(policy) - payload


def _book_bits(bits: int) -> int:
    return 16 * 2**bits  # float16 centroids


@register_strategy
@dataclass(frozen=True)
class ADMM(Strategy):
    """Constrained sparsity + codebook quantization by ADMM; see the module docstring.

    Attributes:
        rho: weight of the proximal pull towards the projection.
        iterations: ADMM iterations (each: projection, SGD steps, dual update).
        share: fraction of the shared fine-tune budget spent on the ADMM phase (the rest fine-tunes after).

    Example:
        >>> # zerobit.compress(model, x, budget=Size(fraction=1/64), strategy="admm", ...)
    """

    rho: float = 5e-3
    iterations: int = 6
    share: float = 0.5
    name = "admm"

    def check_budget(self, budget: Budget) -> None:
        if not isinstance(budget, Size):
            raise BudgetError("ADMM constrains the file size (bits · nonzeros); give a Size budget")

    def search(self, problem: Problem) -> SearchResult:
        self.check_budget(problem.budget)
        self._check_channels_fit(problem)
        graph = problem.graph
        model = copy.deepcopy(problem.model)
        weights = {n: model.get_submodule(n).weight for n in graph.weight_layers}  # a tied weight once
        bits = dict.fromkeys(graph.groups, 8)
        dual = {n: torch.zeros_like(w) for n, w in weights.items()}
        epochs = problem.finetune.epochs * self.share / self.iterations
        proj, density = {}, dict.fromkeys(graph.layers, 1.0)
        for k in range(self.iterations):
            target = {n: (w.detach() + dual[n]) for n, w in weights.items()}
            if k in (0, self.iterations // 2):
                bits = self._choose_bits(problem, target, density)
            _masks, bits, proj, density = self._project(problem, target, bits, density)

            def penalty(proj=proj) -> torch.Tensor:
                return self.rho / 2 * sum(((weights[n] - proj[n] + dual[n]) ** 2).sum() for n in weights)

            # the proximal pull is a closure: this search step trains in this process (the final fine-tune may not)
            cfg = replace(problem.finetune, seed=problem.finetune.seed + k, processes=1)
            finetune(model, problem.train_data, cfg, teacher=problem.model, progress=problem.progress,
                     epochs=epochs, penalty=penalty, task=problem.task)
            for n, w in weights.items():
                dual[n] += w.detach() - proj[n]
        policy = self._final_policy(problem, model, bits, density)
        return SearchResult(policy, None, finetune_epochs_used=problem.finetune.epochs * self.share,
                            info={"bits": bits, "density": {n: round(d, 4) for n, d in density.items()}},
                            start_model=model)

    def _check_channels_fit(self, problem: Problem) -> None:
        """Refuse, before any work, a budget that every channel cannot fit with (almost) no weights at 2 bits.

        ADMM's sparsity is unstructured: it removes only channels it happens to empty in every layer of their
        group. Below this floor — the scales, biases and the tensors outside the layers (a transformer's
        positional embeddings and LayerNorms) of every channel — it could reach the budget only by emptying
        channels wholesale, which left a dead network (ViT at 1/32 of its bytes: the floor is 21.6 KB of a
        17.6 KB budget, and ADMM returned a 6.4 KB file at 10% accuracy)."""
        graph = problem.graph
        floor = problem.cost(self._policy(problem, dict.fromkeys(graph.groups, ADMM_BITS[-1]),
                                          dict.fromkeys(graph.layers, 0.0)))
        if floor > problem.limit:
            raise BudgetError(f"ADMM keeps every channel (it prunes single weights), and every channel's scales, "
                              f"biases and other tensors alone take {amount(floor)} bytes, over the budget "
                              f"({amount(problem.limit)}); use a strategy that removes channels (uniform, "
                              "sequential, ajpq, sbs) or a larger budget")

    def _sparse(self, problem: Problem, target: dict[str, torch.Tensor], bits: dict[str, int],
                density: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
        """Sparse projection at fixed bits: masks, their densities, and the bits left for codes."""
        graph = problem.graph
        layer_bits = {n: bits[graph.layers[n].out_group] for n in graph.weight_layers}
        payload = 8 * (problem.limit - _payload_overhead(problem, self._policy(problem, bits, density)))
        position = {n: min(1 / max(density[n], 1e-3), 10.0) for n in graph.weight_layers}
        per_weight = {n: layer_bits[n] + position[n] for n in graph.weight_layers}
        books = sum(_book_bits(b) for b in layer_bits.values())
        scores = torch.cat([(target[n] ** 2).flatten() / per_weight[n] for n in graph.weight_layers])
        costs = torch.cat([torch.full((target[n].numel(),), per_weight[n], device=target[n].device)
                           for n in graph.weight_layers])
        order = torch.argsort(scores, descending=True)
        keep = int((torch.cumsum(costs[order], 0) <= payload - books).sum())
        kept = torch.zeros_like(scores)
        kept[order[:keep]] = 1.0
        masks, start, new_density = {}, 0, dict(density)
        for n in graph.weight_layers:
            masks[n] = kept[start:start + target[n].numel()].view_as(target[n]).bool()
            start += target[n].numel()
            new_density[n] = max(float(masks[n].float().mean()), 1.0 / target[n].numel())
        positions = sum(float(masks[n].sum()) * position[n] for n in graph.weight_layers)
        return masks, new_density, payload - positions

    def _error(self, problem: Problem, target: dict, masks: dict, bits: dict[str, int]) -> float:
        """Squared error of the projection: energy of the dropped weights + k-means error of the kept ones."""
        total = 0.0
        for n in problem.graph.weight_layers:
            layer = problem.graph.layers[n]
            kept = target[n][masks[n]]
            total += float((target[n][~masks[n]] ** 2).sum())
            total += codebook_error(kept, kmeans_1d(kept, 2 ** bits[layer.out_group], iterations=10))
        return total

    def _choose_bits(self, problem: Problem, target: dict, density: dict[str, float]) -> dict[str, int]:
        """Joint choice: lower one group's bits at a time while that lowers the projection error.

        Lowering bits frees room for more nonzeros; the sparse projection at each candidate decides how many.
        """
        for b in ADMM_BITS:  # start at the highest width leaving room for a quarter of the weights
            bits = dict.fromkeys(problem.graph.groups, b)
            masks, dens, _ = self._sparse(problem, target, bits, density)
            total = sum(m.numel() for m in masks.values())
            if sum(int(m.sum()) for m in masks.values()) >= 0.25 * total:
                break
        best_err = self._error(problem, target, masks, bits)
        while True:
            best = None
            for g, b in bits.items():
                i = ADMM_BITS.index(b)
                if i + 1 == len(ADMM_BITS):
                    continue
                trial = bits | {g: ADMM_BITS[i + 1]}
                t_masks, _, _ = self._sparse(problem, target, trial, dens)
                err = self._error(problem, target, t_masks, trial)
                if err < best_err:
                    best, best_err = trial, err
            if best is None:
                return bits
            bits = best
            _, dens, _ = self._sparse(problem, target, bits, dens)

    def _project(self, problem: Problem, target: dict[str, torch.Tensor], bits: dict[str, int],
                 density: dict[str, float]) -> tuple:
        """Sparse then codebook projection of W + U at the given bits (lowered further only if over budget)."""
        graph = problem.graph
        masks, density, code_budget = self._sparse(problem, target, bits, density)
        errors = {n: {b: codebook_error(target[n][masks[n]], kmeans_1d(target[n][masks[n]], 2**b, iterations=10))
                      for b in ADMM_BITS} for n in graph.weight_layers}
        nnz = {n: float(masks[n].sum()) for n in graph.weight_layers}
        bits = self._knapsack(problem, errors, nnz, code_budget, start=bits)
        proj = {}
        for n in graph.weight_layers:
            values = target[n][masks[n]]
            book = kmeans_1d(values, 2 ** bits[graph.layers[n].out_group])
            v = torch.zeros_like(target[n])
            v[masks[n]] = book[nearest(values, book)]
            proj[n] = v
        return masks, bits, proj, density

    def _knapsack(self, problem: Problem, errors: dict, nnz: dict, payload: float,
                  start: dict[str, int]) -> dict[str, int]:
        """Multiple-choice knapsack, greedy: lower the group with the least Δerror/Δbits until codes fit."""
        graph = problem.graph
        bits = dict(start)

        def group_cost(g: str, b: int) -> float:
            return sum(nnz[n] * b + _book_bits(b) for n in graph.groups[g].layers if n in nnz)

        def group_error(g: str, b: int) -> float:
            return sum(errors[n][b] for n in graph.groups[g].layers if n in errors)

        while sum(group_cost(g, b) for g, b in bits.items()) > payload:
            best, best_ratio = None, float("inf")
            for g, b in bits.items():
                i = ADMM_BITS.index(b)
                if i + 1 == len(ADMM_BITS):
                    continue
                saved = group_cost(g, b) - group_cost(g, ADMM_BITS[i + 1])
                ratio = (group_error(g, ADMM_BITS[i + 1]) - group_error(g, b)) / max(saved, 1e-9)
                if saved > 0 and ratio < best_ratio:
                    best, best_ratio = g, ratio
            if best is None:
                break
            bits[best] = ADMM_BITS[ADMM_BITS.index(bits[best]) + 1]
        return bits

    def _policy(self, problem: Problem, bits: dict[str, int], density: dict[str, float],
                removed: dict[str, set[int]] | None = None) -> Policy:
        removed = removed or {}
        groups = {g: GroupDecision(tuple(0 if c in removed.get(g, ()) else bits[g] for c in range(grp.channels)))
                  for g, grp in problem.graph.groups.items()}
        layers = {n: LayerDecision(min(0.9999, 1 - density[n]), codebook=True) for n in problem.graph.layers}
        return Policy(groups, problem.act_bits, layers=layers)

    def _final_policy(self, problem: Problem, model: torch.nn.Module, bits: dict[str, int],
                      density: dict[str, float]) -> Policy:
        """Policy of the trained weights: empty channels removed, then sparsity raised until the file fits."""
        graph = problem.graph
        removed: dict[str, set[int]] = {}
        for g, grp in graph.groups.items():
            if not grp.prunable:
                continue
            alive = torch.zeros(grp.channels)
            for n in grp.layers:
                w = model.get_submodule(n).weight
                alive += magnitude_mask(w, 1 - density[n]).flatten(1).sum(1).cpu()
            empty = set(torch.nonzero(tied_scores(alive, grp.tie, grp.span) == 0).flatten().tolist())  # decisions
            if len(empty) < grp.block:
                removed[g] = {c for c in range(grp.channels) if grp.decision_index(c) in empty}
        policy = self._policy(problem, bits, density, removed)
        for _ in range(200):
            if problem.fits(policy):
                return policy
            density = {n: d * 0.98 for n, d in density.items()}
            policy = self._policy(problem, bits, density, removed)
        raise BudgetError(f"ADMM could not fit {problem.limit:,.0f} bytes; the smallest it reached was "
                          f"{problem.cost(policy):,.0f}")

