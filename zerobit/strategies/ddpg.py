"""A small DDPG agent as in AMC/HAQ: actor and critic MLPs, replay, truncated-normal exploration.

Every transition of an episode stores that episode's final reward (minus a moving-average baseline) and the
discount is 1, so the critic learns Q(state, action) ≈ expected episode reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DDPGConfig:
    """Agent settings (defaults from AMC/HAQ, except that exploration anneals over the search's length)."""

    hidden: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01
    batch_size: int = 64
    replay: int = 2000
    sigma: float = 0.5
    sigma_decay: float | None = None  # per learned episode; None: anneal to sigma_final by the last episode
    sigma_final: float = 0.02
    baseline_decay: float = 0.95


def _mlp(n_in: int, n_out: int, hidden: int, out: nn.Module | None) -> nn.Sequential:
    layers = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


class DDPG:
    """Actor μ(s) ∈ [0,1]^A, critic Q(s, a), target copies updated softly (τ)."""

    def __init__(self, state_dim: int, action_dim: int, config: DDPGConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.config = config
        self.actor = _mlp(state_dim, action_dim, config.hidden, nn.Sigmoid())
        self.critic = _mlp(state_dim + action_dim, 1, config.hidden, None)
        self.actor_target = _mlp(state_dim, action_dim, config.hidden, nn.Sigmoid())
        self.critic_target = _mlp(state_dim + action_dim, 1, config.hidden, None)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self.states = np.zeros((config.replay, state_dim), np.float32)
        self.actions = np.zeros((config.replay, action_dim), np.float32)
        self.rewards = np.zeros(config.replay, np.float32)
        self.size = 0
        self.cursor = 0
        self.baseline: float | None = None
        self.sigma = config.sigma
        self.decay = config.sigma_decay or 0.95
        self.rng = np.random.default_rng(seed)

    def act(self, state: np.ndarray, explore: bool, warmup: bool) -> np.ndarray:
        """Action for `state`: uniform random while warming up, else μ(s) plus truncated-normal noise."""
        dim = self.actions.shape[1]
        if warmup:
            return self.rng.uniform(0, 1, dim).astype(np.float32)
        with torch.no_grad():
            mu = self.actor(torch.from_numpy(state).float()[None])[0].numpy()
        if not explore:
            return mu
        noise = self.rng.normal(0, self.sigma, dim)
        for _ in range(20):  # truncate to [0, 1] by resampling
            bad = (mu + noise < 0) | (mu + noise > 1)
            if not bad.any():
                break
            noise[bad] = self.rng.normal(0, self.sigma, int(bad.sum()))
        return np.clip(mu + noise, 0, 1).astype(np.float32)

    def remember(self, states: list[np.ndarray], actions: list[np.ndarray], reward: float) -> float:
        """Store an episode, every transition with the episode's reward minus the moving baseline."""
        d = self.config.baseline_decay
        self.baseline = reward if self.baseline is None else d * self.baseline + (1 - d) * reward
        advantage = reward - self.baseline
        for s, a in zip(states, actions, strict=True):
            self.states[self.cursor], self.actions[self.cursor], self.rewards[self.cursor] = s, a, advantage
            self.cursor = (self.cursor + 1) % self.config.replay
            self.size = min(self.size + 1, self.config.replay)
        return advantage

    def update(self, steps: int) -> None:
        """`steps` minibatch updates of critic (regress to reward, discount 1) and actor (ascend Q)."""
        if self.size < self.config.batch_size:
            return
        for _ in range(steps):
            idx = self.rng.integers(0, self.size, self.config.batch_size)
            s = torch.from_numpy(self.states[idx])
            a = torch.from_numpy(self.actions[idx])
            r = torch.from_numpy(self.rewards[idx])[:, None]
            q = self.critic(torch.cat([s, a], 1))
            critic_loss = nn.functional.mse_loss(q, r)
            self.opt_critic.zero_grad()
            critic_loss.backward()
            self.opt_critic.step()
            actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
            self.opt_actor.zero_grad()
            actor_loss.backward()
            self.opt_actor.step()
            for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, t in zip(net.parameters(), target.parameters(), strict=True):
                    t.data.mul_(1 - self.config.tau).add_(self.config.tau * p.data)

    def anneal_over(self, episodes: int) -> None:
        """Exploration noise decays from sigma to sigma_final over this many learned episodes (unless a fixed
        sigma_decay is configured): AMC/HAQ's fixed 0.95 per episode leaves a 300-episode search exploring for
        only its first ~60 learned episodes. A resumed search keeps the schedule it was started with."""
        if self.config.sigma_decay is None:
            self.decay = (self.config.sigma_final / self.config.sigma) ** (1 / max(1, episodes))

    def end_episode(self, warmup: bool) -> None:
        if not warmup:
            self.sigma *= self.decay

    # ---- checkpointing: tensors go to safetensors, the rest to JSON ----
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, module in (("actor", self.actor), ("critic", self.critic), ("actor_t", self.actor_target),
                               ("critic_t", self.critic_target)):
            out |= {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}
        for prefix, opt in (("opt_a", self.opt_actor), ("opt_c", self.opt_critic)):
            for pid, st in opt.state_dict()["state"].items():
                out |= {f"{prefix}.{pid}.{k}": torch.as_tensor(v).clone() for k, v in st.items()}
        out |= {"replay.states": torch.from_numpy(self.states.copy()),
                "replay.actions": torch.from_numpy(self.actions.copy()),
                "replay.rewards": torch.from_numpy(self.rewards.copy())}
        return out

    def scalars(self) -> dict:
        return {"size": self.size, "cursor": self.cursor, "baseline": self.baseline, "sigma": self.sigma,
                "decay": self.decay, "rng": self.rng.bit_generator.state}

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        for prefix, module in (("actor", self.actor), ("critic", self.critic), ("actor_t", self.actor_target),
                               ("critic_t", self.critic_target)):
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items()
                                    if k.startswith(prefix + ".")})
        for prefix, opt in (("opt_a", self.opt_actor), ("opt_c", self.opt_critic)):
            state = opt.state_dict()
            per: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(prefix + "."):
                    _, pid, name = k.split(".", 2)
                    per.setdefault(int(pid), {})[name] = v.clone()
            state["state"] = per
            opt.load_state_dict(state)
        self.states[:] = tensors["replay.states"].numpy()
        self.actions[:] = tensors["replay.actions"].numpy()
        self.rewards[:] = tensors["replay.rewards"].numpy()
        self.size, self.cursor = scalars["size"], scalars["cursor"]
        self.baseline, self.sigma, self.decay = scalars["baseline"], scalars["sigma"], scalars["decay"]
        self.rng.bit_generator.state = scalars["rng"]
