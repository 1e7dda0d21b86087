"""Decision rules evaluated on the simulator. Each has ``act(sim, obs) -> (actions [N], entries)``;
``entries`` is None (use Eq. 4) or a per-agent entry index (only the oracle overrides Eq. 4).

- ``Greedy(delta)`` (Greedy-0.1/0.3/0.5): our reading of the paper's greedy baselines — serve the Eq. 4
  entry when its L2 distance to the request, sqrt(2 - 2 cos), is at most delta (0.1/0.3/0.5 ~ cosine
  0.995/0.955/0.875), else forward;
- ``GreedyLLM``: always forward (B) — no cache;
- ``RandomPolicy``: uniform over the available actions;
- ``StaticThreshold(t)``: GPTCache/LiteLLM as shipped — serve when the best hit's cosine >= t, else
  forward; t is chosen on validation (``best_threshold``);
- ``Oracle``: knows which cached entries are true duplicates and what the LLM will answer; takes the
  action with the best immediate reward, serving the best true duplicate (the ceiling, and the expert);
- ``NeuralPolicy``: a trained actor, argmax, or the calibrated serving rule (A iff P(A) >= tau, else
  the better of B and C).
"""

from __future__ import annotations

import math

import numpy as np

from velo_proxy import features as F
from velo_proxy.calibration import serving_actions

A, B, C = F.ACTION_A, F.ACTION_B, F.ACTION_C


class Greedy:
    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.name = f"Greedy-{delta:g}"

    def act(self, sim, obs):
        acts = []
        for i in range(sim.N):
            j = sim.sel[i]
            ok = j is not None and math.sqrt(max(0.0, 2.0 - 2.0 * sim.hits[i][j].similarity)) <= self.delta
            acts.append(A if ok else B)
        return np.array(acts), None


class GreedyLLM:
    """No cache at all (not even the exact tier): every request goes to the LLM."""

    name = "Greedy-LLM"
    uses_cache = False

    def act(self, sim, obs):
        return np.full(sim.N, B), None


class RandomPolicy:
    name = "Random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, sim, obs):
        return np.array([int(self.rng.integers(3)) if sim.sel[i] is not None else B for i in range(sim.N)]), None


class StaticThreshold:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.name = f"Static threshold ({threshold:.2f})"

    def act(self, sim, obs):
        return np.array([A if sim.hits[i] and sim.hits[i][0].similarity >= self.threshold else B
                         for i in range(sim.N)]), None


class Oracle:
    name = "Oracle"

    def act(self, sim, obs):
        return sim.oracle_actions(oracle_entry=True)


class Expert:
    """The demonstrator of Algorithm 1: knows which hits are true duplicates (and so what serving the
    Eq. 4 entry returns) but not the answer the LLM is about to give; maximises the expected immediate
    reward (``EdgeSim.expected_action_rewards``)."""

    name = "Expert"

    def act(self, sim, obs):
        return sim.expert_actions(), None


class NeuralPolicy:
    def __init__(self, actor, name: str, *, tau: float | None = None) -> None:
        self.actor = actor
        self.name = name
        self.tau = tau

    def probs(self, obs) -> np.ndarray:
        import torch

        batch = F.stack_observations(obs)
        with torch.no_grad():
            logits = self.actor(*(torch.from_numpy(batch[k]) for k in F.INPUT_NAMES))
            return torch.softmax(logits, dim=-1).numpy()

    def act(self, sim, obs):
        p = self.probs(obs)
        return decide(p, self.tau), None


def decide(p: np.ndarray, tau: float | None) -> np.ndarray:
    """The proxy's serving rule (``velo_proxy.calibration.serving_actions``) on action probabilities
    [B, 3]: argmax, or with a calibrated tau: A iff P(A) >= tau, else the better of B and C."""
    return serving_actions(p, tau)
