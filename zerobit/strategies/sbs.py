"""SBS: single-path bit sharing (seed 002) — the policy is trained, not searched.

Every layer's weights and inputs go through the single-path quantizer of zerobit.quant.sbs; gates choose each
coupled group's weight width, each layer's input width and which output channels stay (a pruning gate per
block of `channels_per_gate` decisions of a group: keep iff its weight norm, relative to the group's mean, is
above a learned threshold). Weights, ranges and thresholds train together on

    task loss (+ distillation) + cost_weight · |log(cost / limit)|

with cost the budget's measure (BOPs, MACs or bytes of the file) of what the gates select, differentiable
through their surrogate gradients; weight gates and activation gates update on alternate steps. Then the gates
are frozen into a Policy, projected to meet the budget exactly (zerobit.strategies.sbs_project), and the rest of
the shared fine-tune budget trains the compressed model from the SBS-trained weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from zerobit.budget import BOPs, Budget, BudgetError, Latency, MACs, Size, amount, layer_bops
from zerobit.data.loaders import batches_of
from zerobit.device import model_device
from zerobit.export.latency import LayerShape, timed_layers
from zerobit.policy import ACT_BITS, BIT_CHOICES, FLOAT_BITS, GroupDecision, Policy, tied_scores
from zerobit.quant.apply import inputs_kept, set_module, weights_per_channel
from zerobit.quant.sbs import (
    DEFAULT_CHAIN,
    SBSAct,
    SBSLayer,
    Thresholds,
    check_chain,
    chosen_bits,
    expected_bits,
    prefix_tails,
    residual_statistic,
    residuals,
)
from zerobit.strategies.base import Problem, SearchResult, Strategy, register_strategy
from zerobit.strategies.sbs_project import Margins, project
from zerobit.strategies.uniform import max_keep
from zerobit.train.calibrate import input_ranges, run_on
from zerobit.train.finetune import finetune
from zerobit.train.loop import Checkpoint


@register_strategy
@dataclass(frozen=True)
class SBS(Strategy):
    """Single-path bit sharing with learnable gates; see the module docstring.

    Attributes:
        bits: candidate weight widths, each dividing the next (default (2, 4, 8)).
        act_bits: candidate activation widths (default (2, 4, 8)); () keeps every input at `compress(act_bits=)`.
        channels_per_gate: decisions of a group sharing one pruning gate (1 = channel-wise).
        cost_weight: λ, the weight of |log(cost/limit)| in the loss.
        share: fraction of the shared fine-tune budget spent training the gates (the rest fine-tunes after). The
            gates nearly settle in 2 epochs on ResNet-20/Fashion-MNIST: with 8 epochs 0.25 did better than 0.5
            (BENCHMARKS.md), with 3 epochs 0.5 did better than 0.3.
        temperature: τ of the bit gates' surrogate gradient (their statistic is ≈ 0.25).
        prune_temperature: τ of the pruning gates (their statistic is ≈ 1, the group's mean norm).
        gate_lr: the thresholds learn at this multiple of the fine-tune learning rate.
        start_margin: every gate starts open, this many temperatures above its threshold (times its sensitivity
            factor with `by_sensitivity`).
        by_sensitivity: scale each bit gate's starting margin by how much closing it would raise the loss
            (measured on 4 batches before training), so the cost term closes the least sensitive gates first.
        min_keep: the strongest blocks of each group, this fraction of them, stay while the gates train (a
            group's threshold can otherwise sweep past most of its channels at once); the projection goes below
            it only when the budget cannot be met otherwise. Lowered to 0.9× the keep-ratio of the uniform policy
            at the lowest weight width where the budget needs fewer channels.
        final_lr: the fine-tune after the gate training starts at this multiple of the fine-tune learning rate
            (the gated training has already trained the weights; 1 = restart at the peak).
        checkpoint: a file where the gate training keeps its progress after every epoch; a killed search
            started again with the same file, settings, model and budget goes on from its last epoch.

    Example:
        >>> # zerobit.compress(model, x, budget=BOPs(fraction=1/128), strategy=SBS(checkpoint="sbs.ckpt"), ...)
    """

    bits: tuple[int, ...] = DEFAULT_CHAIN
    act_bits: tuple[int, ...] = DEFAULT_CHAIN
    channels_per_gate: int = 1
    cost_weight: float = 1.0
    share: float = 0.5
    temperature: float = 0.1
    prune_temperature: float = 0.2
    gate_lr: float = 1.0
    start_margin: float = 1.0
    by_sensitivity: bool = True
    min_keep: float = 0.5
    final_lr: float = 1.0
    checkpoint: str | None = None
    name = "sbs"

    def __post_init__(self) -> None:  # one width may come as an int (--option act_bits=8)
        for key in ("bits", "act_bits"):
            value = getattr(self, key)
            object.__setattr__(self, key, (value,) if isinstance(value, int) else tuple(value))

    def check_budget(self, budget: Budget) -> None:
        if not isinstance(budget, (BOPs, MACs, Size, Latency)):
            raise BudgetError(f"SBS trains under BOPs, MACs, Size or Latency budgets, not {type(budget).__name__}")

    def _checkpoint(self, problem: Problem, net: GatedNet, history: list[dict], epochs: float) -> Checkpoint | None:
        """The gate training's checkpoint: the gated model and optimiser (in `fit`), the step count and history."""
        if not self.checkpoint:
            return None
        settings = {k: v for k, v in asdict(self).items() if k != "checkpoint"}
        identity = {"sbs": settings, "problem": problem.identity(), "epochs": epochs,
                    "finetune": {k: v for k, v in asdict(problem.finetune).items() if k not in ("epochs", "processes")}}

        def load(extra: dict) -> None:
            net.steps, net._offset = extra["steps"], extra["offset"]
            history[:] = [row | {k: {int(b): n for b, n in row[k].items()} for k in ("weight_bits", "act_bits")}
                          for row in extra["history"]]  # JSON keys are strings; the widths are ints

        def save() -> dict:
            return {"steps": net.steps, "offset": net._offset, "history": history}

        return Checkpoint(self.checkpoint, identity, save, load)

    def search(self, problem: Problem) -> SearchResult:
        self.check_budget(problem.budget)
        check_chain(self.bits, [b for b in BIT_CHOICES if b > 0], "weight bit-widths")
        if self.act_bits:
            check_chain(self.act_bits, [b for b in ACT_BITS if b < FLOAT_BITS], "activation bit-widths")
        if (self.channels_per_gate < 1 or not 0 <= self.share <= 1 or self.cost_weight < 0
                or not 0 <= self.min_keep <= 1 or self.final_lr <= 0):
            raise ValueError("SBS needs channels_per_gate ≥ 1, 0 ≤ share ≤ 1, 0 ≤ min_keep ≤ 1, cost_weight ≥ 0 "
                             "and final_lr > 0")
        net = GatedNet(problem, self)
        epochs = problem.finetune.epochs * self.share
        history: list[dict] = []

        def penalty() -> torch.Tensor:
            cost = net.cost()
            net.steps += 1
            return self.cost_weight * torch.log(cost / problem.limit).abs()

        def on_epoch(epoch: int, loss: float) -> str:
            policy = net.policy()
            row = {"epoch": epoch, "loss": round(loss, 4), "cost": problem.cost(policy), "limit": problem.limit}
            row |= net.open_counts(policy)
            history.append(row)
            return (f"sbs {epoch}: loss {loss:.3f}, cost {amount(row['cost'])} / {amount(problem.limit)} "
                    f"{problem.budget.unit}, weight bits {row['weight_bits']}, act bits {row['act_bits']}, "
                    f"channels {row['kept']}/{row['channels']}")

        search = replace(problem.finetune, processes=1)  # gates train here (closures); the final fine-tune may not
        finetune(net.model, problem.train_data, search, teacher=problem.model, progress=problem.progress,
                 epochs=epochs, penalty=penalty, task=problem.task, on_epoch=on_epoch,
                 checkpoint=self._checkpoint(problem, net, history, epochs))
        net.model.eval()
        with torch.no_grad():
            net.refresh()
        found, margins, start = net.policy(), net.margins(), net.unwrap()

        def answer(target: Problem) -> SearchResult:  # the trained gates projected onto `target`'s budget
            return SearchResult(project(target, found, margins), None, finetune_epochs_used=epochs,
                                start_model=start, retarget=answer,
                                info={"sbs_history": history, "sbs_policy_cost": target.cost(found),
                                      "sbs_steps": net.steps}, finetune_lr=self.final_lr)

        return answer(problem)


class GatedNet:
    """A copy of the problem's model with every quantized layer an SBSLayer, and the gates of every group."""

    def __init__(self, problem: Problem, cfg: SBS) -> None:
        self.problem, self.cfg, self.graph = problem, cfg, problem.graph
        self.chain = check_chain(cfg.bits, [b for b in BIT_CHOICES if b > 0])
        self.act_chain = tuple(sorted(cfg.act_bits))
        self.model = copy.deepcopy(problem.model)
        self.steps = 0
        # the floor of kept channels, lowered to 0.9× what a uniform policy at the lowest weight width keeps when
        # the budget is below it: the gates can then reach the budget, and the projection needs no deep cut of
        # one group (at 1/128 of ResNet-20's bytes it cut the stage-3 residual stream to 2 of 64 channels)
        most = max_keep(problem, min(self.chain))
        self.min_keep = cfg.min_keep if most is None else min(cfg.min_keep, 0.9 * most)
        graph, model = self.graph, self.model
        ranges = {}
        if self.act_chain:
            quantized = [n for n, lay in graph.layers.items() if lay.kind != "embedding"]
            calib = batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed)
            found = input_ranges(model, [model.get_submodule(n) for n in quantized], calib, task=problem.task)
            ranges = {n: found[model.get_submodule(n)] for n in quantized}
        self.layers: dict[str, SBSLayer] = {}
        self.bns: dict[str, nn.Module] = {}
        for name, layer in graph.layers.items():
            bn = model.get_submodule(layer.bn) if layer.bn else None
            act = None
            if name in ranges:
                act = SBSAct(self.act_chain, ranges[name][0], ranges[name][1], cfg.temperature, cfg.gate_lr,
                             cfg.start_margin)
            q = SBSLayer(model.get_submodule(name), bn, self.chain, act)
            set_module(model, name, q)
            if layer.bn:
                self.bns[layer.bn] = bn
                set_module(model, layer.bn, nn.Identity())
            self.layers[name] = q
        self.bit_gates = nn.ModuleDict({_key(i): Thresholds(len(self.chain) - 1, cfg.gate_lr, cfg.start_margin)
                                        for i, _ in enumerate(graph.groups)})
        self.prune_gates = nn.ModuleDict({_key(i): Thresholds(1, cfg.gate_lr, cfg.start_margin)
                                          for i, g in enumerate(graph.groups.values()) if g.prunable})
        model.add_module("sbs_bit_gates", self.bit_gates)
        model.add_module("sbs_prune_gates", self.prune_gates)
        self.keys = {g: _key(i) for i, g in enumerate(graph.groups)}
        self.blocks = {g: torch.tensor([grp.decision_index(c) // cfg.channels_per_gate for c in range(grp.channels)])
                       for g, grp in graph.groups.items()}
        self.state: dict[str, dict] = {}
        self._offset, self._hook = 0.0, model.register_forward_pre_hook(lambda m, a: self.refresh())
        self.recording = False
        with torch.no_grad():
            self.refresh()
            if self.act_chain:  # one batch sets the activation gates (each starts open by start_margin)
                model.eval()
                run_on(model, next(iter(calib)), model_device(model), problem.task)
        if cfg.by_sensitivity:
            self._place_by_sensitivity(batches_of(problem.train_data, 256, shuffle=True, seed=problem.finetune.seed))

    def _place_by_sensitivity(self, batches, max_batches: int = 4) -> None:
        """Start each bit gate open by a margin that grows with what closing it would cost: Σ (∂L/∂x · Δx)² over
        a few batches (Δx what the gate's residuals add; the loss is the task's Fisher loss), relative to the
        median gate's (square root, clipped to ¼–4×). The cost term then closes the cheapest gates first."""
        model, task, device = self.model, self.problem.task, model_device(self.model)
        acts = [q.act for q in self.layers.values() if q.act is not None and len(q.act.chain) > 1]
        for a in acts:
            a.sensitivity = torch.zeros(len(a.chain) - 1, device=device)
        weights = {g: torch.zeros(len(self.chain) - 1, device=device) for g in self.graph.groups}
        self.recording = True
        model.eval()
        try:
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                batch = task.to_device(batch, device)
                task.fisher_loss(task.forward(model, batch).float(), batch).backward()
                for g, grp in self.graph.groups.items():
                    for n in grp.layers:
                        q = self.layers[n]
                        if q.weight_q.grad is None or len(self.chain) < 2:
                            continue
                        scale = 2 * q.weight_range()
                        ones = [1.0] * (len(self.chain) - 1)
                        weights[g] += torch.stack([((q.weight_q.grad * d * scale) ** 2).sum()
                                                   for d in prefix_tails(q.cached_parts, ones)])
                model.zero_grad(set_to_none=True)
        finally:
            self.recording = False
        found = [s for s in [*weights.values(), *(a.sensitivity for a in acts)] if len(s)]
        if not found:
            return
        median = torch.cat(found).median().clamp_min(1e-30)

        def margins(sens: torch.Tensor) -> torch.Tensor:
            return self.cfg.start_margin * (sens / median).sqrt().clamp(0.25, 4.0)

        for g, sens in weights.items():
            if len(sens):
                self.bit_gates[self.keys[g]].place(torch.stack(self.state[g]["stats"]), margins(sens),
                                                   self.cfg.temperature)
        for a in acts:
            a.thresholds.place(torch.stack(a.stats), margins(a.sensitivity), self.cfg.temperature)
            a.sensitivity = None

    # -- the forward pass ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute every group's gates and its layers' quantized weights (before each forward pass)."""
        weights_phase = self.steps % 2 == 0 or not self.model.training
        for g, grp in self.graph.groups.items():
            layers = [self.layers[n] for n in grp.layers]
            units = [q.unit() for q in layers]
            parts = [residuals(z, self.chain) for z in units]
            stats = residual_statistic(parts[0], self.chain, parts[1:])
            thresholds = self.bit_gates[self.keys[g]]
            thresholds.frozen = not weights_phase
            gates = thresholds.gates(stats, self.cfg.temperature)
            keep, norms = None, None
            if grp.prunable:
                norms = self._block_norms(g, layers)
                prune = self.prune_gates[self.keys[g]]
                prune.frozen = not weights_phase
                prune.start(norms.detach().min().view(1), self.cfg.prune_temperature)  # below the weakest block
                block_keep = prune.gates([norms], self.cfg.prune_temperature)[0]
                floor = max(1, math.ceil(self.min_keep * len(norms)))
                forced = torch.zeros_like(block_keep, dtype=torch.bool)
                forced[torch.topk(norms.detach(), floor).indices] = True
                block_keep = torch.where(forced, torch.ones_like(block_keep), block_keep)
                keep = block_keep[self.blocks[g].to(block_keep.device)]
            for q, z, p in zip(layers, units, parts, strict=True):
                q.set_weight(z, p, gates, keep)
                if self.recording:
                    q.weight_q.retain_grad()
                    q.cached_parts = p
            self.state[g] = {"stats": stats, "gates": gates, "keep": keep, "norms": norms}
        for q in self.layers.values():
            if q.act is not None:
                q.act.thresholds.frozen = weights_phase and self.model.training

    def _block_norms(self, group: str, layers: list[SBSLayer]) -> torch.Tensor:
        """Each gate's weight norm: per channel mean |w| over the group's layers (each relative to its layer's
        mean), per decision (tied copies, a head's channels), per block of `channels_per_gate`, over the mean."""
        grp = self.graph.groups[group]
        per_channel = sum(q.layer.weight.flatten(1).abs().mean(1) / q.layer.weight.abs().mean().detach().clamp_min(
            1e-12) for q in layers) / len(layers)
        per_decision = tied_scores(per_channel, grp.tie, grp.span) / (grp.tie * grp.span)
        blocks = self.blocks[group][:grp.channels // grp.tie:grp.span].to(per_decision.device)
        per_block = torch.zeros(int(blocks.max()) + 1, device=per_decision.device).index_add(0, blocks, per_decision)
        per_block = per_block / torch.bincount(blocks).to(per_block.dtype)
        return per_block / per_block.mean().detach().clamp_min(1e-12)

    # -- the cost ----------------------------------------------------------------------------------------------
    def cost(self) -> torch.Tensor:
        """The budget's measure of what the gates select (differentiable), in the budget's unit."""
        graph, budget = self.graph, self.problem.budget
        kept = {g: (s["keep"].sum() if s["keep"] is not None else torch.tensor(float(graph.groups[g].channels)))
                for g, s in self.state.items()}
        wbits = {g: expected_bits(self.chain, s["gates"]) for g, s in self.state.items()}
        total, timed = torch.zeros(()), set(timed_layers(graph))
        for name, layer in graph.layers.items():
            q, out = self.layers[name], layer.out_group
            abits = q.act.bits() if q.act is not None else torch.tensor(
                float(self.problem.act_bits if layer.kind != "embedding" else FLOAT_BITS))
            if isinstance(budget, Latency) and name in timed:  # the table's time at the expected kept channels
                from zerobit.export.onnx import weight_format

                fmt = weight_format([chosen_bits(self.chain, self.state[out]["gates"])])
                act = "u8" if float(abits.detach()) < FLOAT_BITS else "float"
                total = total + budget.scale * budget.table().layer_ms_torch(
                    LayerShape.of(graph, name), inputs_kept(graph, kept, name), kept[out], fmt, act)
            elif isinstance(budget, Latency):
                continue  # a table lookup: in the whole-model calibration
            elif isinstance(budget, BOPs):
                total = total + layer_bops(graph, name, kept, kept[out] * wbits[out], abits)
            elif isinstance(budget, MACs):
                total = total + layer_bops(graph, name, kept, kept[out], 1.0)
            elif not layer.shares:  # a tied weight is stored once, with the layer that owns it
                total = total + kept[out] * wbits[out] * weights_per_channel(graph, kept, name) / 8
        if self.steps % 20 == 0:  # what the differentiable count leaves out (headers, scales, biases), exactly
            self._offset = self.problem.cost(self.policy()) - float(total.detach())
        return (total + self._offset).clamp_min(1e-6)

    # -- reading the gates -----------------------------------------------------------------------------------
    def policy(self) -> Policy:
        """The policy the gates select now."""
        groups = {}
        for g, grp in self.graph.groups.items():
            s = self.state[g]
            bits = chosen_bits(self.chain, s["gates"])
            keep = s["keep"].detach().cpu().tolist() if s["keep"] is not None else [1.0] * grp.channels
            groups[g] = GroupDecision(tuple(bits if k > 0.5 else 0 for k in keep))
            if groups[g].kept == 0:  # a group keeps its strongest gate's channels
                best = int(torch.argmax(s["norms"]))
                groups[g] = GroupDecision(tuple(bits if int(b) == best else 0 for b in self.blocks[g]))
        act = {n: chosen_bits(self.act_chain, q.act.gates) for n, q in self.layers.items() if q.act is not None}
        return Policy(groups, self.problem.act_bits, {"strategy": "sbs"}, act=act)

    def margins(self) -> Margins:
        """How far each gate is from flipping, in units of its temperature (positive = open)."""
        cfg = self.cfg
        weight = {g: [m / cfg.temperature for m in self.bit_gates[self.keys[g]].margins(s["stats"])]
                  for g, s in self.state.items()}
        channel = {g: ((s["norms"] - self.prune_gates[self.keys[g]].alpha).detach().cpu() / cfg.prune_temperature)
                   for g, s in self.state.items() if s["norms"] is not None}
        act = {n: [m / cfg.temperature for m in q.act.thresholds.margins(q.act.stats)]
               for n, q in self.layers.items() if q.act is not None}
        floor = {g: max(1, math.ceil(self.min_keep * len(v))) for g, v in channel.items()}
        return Margins(self.chain, self.act_chain, weight, channel, act, self.blocks, floor)

    def open_counts(self, policy: Policy) -> dict:
        """Groups per weight width, layers per input width, channels kept (for progress output)."""
        wb: dict[int, int] = {}
        for d in policy.groups.values():
            b = max(d.kept_bits())
            wb[b] = wb.get(b, 0) + 1
        ab: dict[int, int] = {}
        for n in self.layers:
            b = policy.act_of(n)
            ab[b] = ab.get(b, 0) + 1
        return {"weight_bits": dict(sorted(wb.items())), "act_bits": dict(sorted(ab.items())),
                "kept": sum(d.kept for d in policy.groups.values()),
                "channels": sum(d.channels for d in policy.groups.values())}

    def unwrap(self) -> nn.Module:
        """The model with its own layers and BatchNorms back (the trained weights), gates removed."""
        self._hook.remove()
        model = self.model
        for name, q in self.layers.items():
            set_module(model, name, q.layer)
        for name, bn in self.bns.items():
            set_module(model, name, bn)
        del model.sbs_bit_gates, model.sbs_prune_gates
        return model.eval()


def _key(i: int) -> str:
    return f"g{i}"

