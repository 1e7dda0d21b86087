"""Decision policies: given the request vector and its top-P hits, choose A (serve a cached answer),
B (forward upstream) or C (forward with cached Q&A as context)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from velo_proxy.store.base import Hit

ACTIONS = ("A", "B", "C")


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "A" | "B" | "C"
    entry: Hit | None  # the hit A serves or C uses as context
    probability: float  # probability of the chosen action under the policy (1.0 for deterministic ones)
    probs: tuple[float, float, float] | None = None  # (A, B, C) when the policy is stochastic


class Policy(abc.ABC):
    version: str

    @abc.abstractmethod
    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float) -> Decision: ...


class ThresholdPolicy(Policy):
    """Serve the best hit when its cosine similarity reaches a fixed threshold (how GPTCache and
    LiteLLM decide); otherwise forward."""

    def __init__(self, *, threshold: float) -> None:
        self.threshold = threshold
        self.version = f"threshold-{threshold:g}"

    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float) -> Decision:
        if hits and hits[0].similarity >= self.threshold:
            return Decision("A", hits[0], 1.0)
        return Decision("B", None, 1.0)
