"""PPO pieces, importable and unit-tested: GAE, the immediate advantage, the clipped surrogate, the value loss, the rollout
buffer (preallocated, shapes visible) and the demonstration share schedule of Algorithm 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout.

    rewards, values, dones: [T, ...]; ``dones[t] = 1`` when the episode ended after step t (no
    bootstrap across it); last_value: [...] value of the state after the last step.
    Returns (advantages, returns = advantages + values), both [T, ...].
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    gae = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        next_v = last_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_v * nonterminal - values[t]
        gae = delta + gamma * lam * nonterminal * gae
        adv[t] = gae
    return adv, adv + values


def immediate_advantage(action_values, probs, actions):
    """Advantage of the action taken against the policy's average, from known expected action values,
    without bootstrapping: Q(a_t) - sum_b pi(b) Q(b). Unavailable actions (value -inf) count as 0; the
    actor gives them probability 0. numpy arrays [n, 3], [n, 3], [n] -> [n]."""
    import numpy as np

    q = np.where(np.isfinite(action_values), action_values, 0.0)
    return (q[np.arange(len(actions)), actions] - (probs * q).sum(1)).astype(np.float32)


def ppo_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped surrogate, to minimise: -mean(min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)).
    ``weight`` (0/1) restricts the mean to some samples (here: those the actor itself chose)."""
    ratio = torch.exp(new_logp - old_logp)
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)
    if weight is None:
        return -surr.mean()
    return -(surr * weight).sum() / weight.sum().clamp_min(1.0)


def value_loss(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((values - returns) ** 2).mean()


def demo_share(update: int, start: float, decay: float, floor: float = 0.0) -> float:
    """Algorithm 1: share of actions taken from the expert at update k, start * decay**k (>= floor)."""
    return max(floor, start * decay**update)


@dataclass
class Rollout:
    """Preallocated rollout storage for T steps of N agents (D = embedding dim, P hits, K features,
    S critic-state width)."""

    request_embedding: torch.Tensor  # [T, N, D]
    hit_embeddings: torch.Tensor  # [T, N, P, D]
    hit_features: torch.Tensor  # [T, N, P, K]
    hit_mask: torch.Tensor  # [T, N, P]
    state: torch.Tensor  # [T, N, S] critic input (global state = all N rows)
    actions: torch.Tensor  # [T, N] long, executed
    expert_actions: torch.Tensor  # [T, N] long, what the expert would do
    from_expert: torch.Tensor  # [T, N] 1 if the executed action came from the expert
    logp: torch.Tensor  # [T, N] log pi_old(executed action)
    values: torch.Tensor  # [T, N]
    rewards: torch.Tensor  # [T, N]
    dones: torch.Tensor  # [T, N]

    @classmethod
    def allocate(cls, T: int, N: int, D: int, P: int, K: int, S: int) -> "Rollout":
        f = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
        i = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
        return cls(f(T, N, D), f(T, N, P, D), f(T, N, P, K), f(T, N, P), f(T, N, S), i(T, N), i(T, N), f(T, N),
                   f(T, N), f(T, N), f(T, N), f(T, N))
