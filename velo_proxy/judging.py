"""Judging, off the request path: does a cached answer answer a new question?

Two judges (``VELO_JUDGE``):

- ``VerifierJudge``: the pair verifier over (new question, cached question) together with the
  agreement of a fresh upstream answer and the cached one (cosine of their embeddings; the paper's
  satisfaction is -L2 of the same vectors). Right when the verifier gives the pair at least 0.5 (when a
  verifier is loaded) and the answers agree at least ``VELO_SHADOW_FAIL_BELOW``. A shadow check pays
  one upstream call for the fresh answer; a near-miss review reuses the answer the request got.
- ``LLMJudge``: a short yes/no prompt to ``VELO_JUDGE_MODEL`` through the same upstream machinery
  (litellm), with the cached answer; its tokens are counted. Anything but yes/no is "unclear" and
  labels nothing.

Every judge call is paid from one ``JudgeBudget`` (calls per minute), so the loop's cost is bounded.
Each verdict becomes a ``Label`` (``velo_proxy.labels``): the pair, the scores the decision saw, the
verdict and its provenance.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np



def satisfaction(cosine: float) -> float:
    """q = -L2 distance of two unit answer embeddings with this cosine, the paper's satisfaction (Eq. 2)."""
    return -math.sqrt(max(0.0, 2.0 - 2.0 * cosine))


def answer_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine, q) of two answer embeddings."""
    cosine = float(np.dot(a, b))
    return cosine, satisfaction(cosine)


class JudgeBudget:
    """A token bucket of judge calls: ``per_min`` calls a minute, bursts up to one minute's worth."""

    def __init__(self, *, per_min: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = float(per_min)
        self._clock = clock
        self._tokens = self.per_min
        self._at = clock()

    def try_spend(self) -> bool:
        now = self._clock()
        self._tokens = min(self.per_min, self._tokens + (now - self._at) * self.per_min / 60.0)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class Label:
    """One judged pair with its provenance (a JSON object in the label store)."""

    kind: str  # "shadow" (a served hit) | "near_miss" (forwarded although a candidate was close)
    judge: str  # "verifier" | "llm"
    correct: bool  # the cached answer answers the new question
    question: str
    cached_question: str
    entry: str  # the cached entry judged
    scope: str
    policy: str  # version of the policy that decided
    similarity: float
    verifier_score: float | None  # what the request path's verifier said of the pair (None: not verified)
    served_score: float  # the score the guard reads: verifier score for verifying policies, else similarity
    request_id: str = ""
    agreement: float | None = None  # cosine of the fresh and the cached answer (verifier judge)
    judge_verifier: float | None = None  # the verifier judge's own score of the pair
    judge_model: str | None = None
    tokens: int = 0  # upstream tokens this judgement cost
    promoted: bool = False
    ts: float = field(default_factory=time.time)
    embedder: str = ""  # id of the embedder that measured ``similarity`` ("": a proxy from before it was logged)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Label":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True, slots=True)
class Verdict:
    correct: bool | None  # None: the judge could not say (failed, unclear)
    tokens: int = 0
    agreement: float | None = None
    judge_verifier: float | None = None
    reason: str = ""  # why there is no verdict


def completion_text(completion: dict[str, Any]) -> str:
    return str(((completion.get("choices") or [{}])[0].get("message") or {}).get("content") or "")


def completion_tokens(completion: dict[str, Any]) -> int:
    usage = completion.get("usage") or {}
    return int(usage.get("total_tokens") or 0)


class VerifierJudge:
    """The project's verifier plus answer agreement. ``embed`` and ``verify`` are the request path's
    fail-open components (None on failure); ``fresh_answer`` asks the upstream (shadow checks)."""

    name = "verifier"

    def __init__(self, *, embed: Callable[[list[str]], Awaitable[np.ndarray | None]],
                 verify: Callable[[str, Sequence[str]], Awaitable[list[float] | None]] | None,
                 agree_at_least: float) -> None:
        self._embed = embed
        self._verify = verify
        self.agree_at_least = agree_at_least

    @property
    def needs_fresh_answer(self) -> bool:
        return True

    async def judge(self, *, question: str, cached_question: str, cached_answer: str,
                    fresh_answer: str | None, tokens: int = 0) -> Verdict:
        if fresh_answer is None:
            return Verdict(None, tokens, reason="no fresh answer")
        vectors = await self._embed([fresh_answer, cached_answer])
        if vectors is None:
            return Verdict(None, tokens, reason="embedder failed")
        agreement, _ = answer_agreement(vectors[0], vectors[1])
        pair = None
        if self._verify is not None:
            scores = await self._verify(question, [cached_question])
            pair = float(scores[0]) if scores else None
        correct = agreement >= self.agree_at_least and (pair is None or pair >= 0.5)
        return Verdict(correct, tokens, agreement=agreement, judge_verifier=pair)


JUDGE_SYSTEM = ("You check a cache of answers. Reply with one word, yes or no: does the candidate answer "
                "correctly and fully answer the question as asked?")


def judge_prompt(question: str, cached_answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Question:\n{question}\n\nCandidate answer:\n{cached_answer}\n\n"
                                        "Does the candidate answer the question? yes or no."}]


class LLMJudge:
    """A yes/no prompt to ``model`` through ``complete`` (the proxy's upstream, litellm underneath)."""

    name = "llm"

    def __init__(self, *, complete: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], model: str) -> None:
        self._complete = complete
        self.model = model

    @property
    def needs_fresh_answer(self) -> bool:
        return False

    async def judge(self, *, question: str, cached_question: str, cached_answer: str,
                    fresh_answer: str | None, tokens: int = 0) -> Verdict:
        from velo_proxy.errors import ProxyError

        payload = {"model": self.model, "messages": judge_prompt(question, cached_answer),
                   "temperature": 0, "max_tokens": 5, "stream": False}
        try:
            completion = await self._complete(payload)
        except ProxyError as err:
            return Verdict(None, tokens, reason=f"judge upstream {err.status}")
        tokens += completion_tokens(completion)
        words = completion_text(completion).strip().lower().split()
        first = words[0].strip(".,!:;\"'") if words else ""
        if first not in ("yes", "no"):
            return Verdict(None, tokens, reason="unclear")
        return Verdict(first == "yes", tokens)


