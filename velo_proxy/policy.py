"""Decision policies: given the request vector and its top-P hits, choose A (serve a cached answer),
B (forward upstream) or C (forward with cached Q&A as context).

- ``VerifiedPolicy`` (the default): serve the best hit the pair verifier (``velo_proxy.verifier``)
  scores at or above the threshold calibrated for the operator's false-hit bound.
- ``ThresholdPolicy``: the static cosine threshold GPTCache and LiteLLM ship (unverified).
- ``LearnedPolicy``: the exported LRS actor (ONNX, onnxruntime only), fed by ``velo_proxy.features``
  exactly as in training — the verifier's scores of the hits the ``verify_rule`` selects are hit
  features (since feature version 2; version 3 adds whether each hit is cached in another language
  than the request) — with the calibrated rule that bounds the false-hit rate; with ``veto`` its A
  decisions are served only when the verifier's score reaches the rule's threshold.

A policy with a ``verify_rule`` tells the engine which hits to verify (``to_verify``); the engine
scores them in one batched verifier call and passes ``scores`` (hit index -> score) to ``decide``.
``scores=None`` means the verifier failed or timed out: such a policy then never serves (fails safe).
- ``PolicyDirectory``: where the retrain job publishes versions; proxies hot-reload from it.
"""

from __future__ import annotations

import abc
import json
import logging
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from velo_proxy import features as F
from velo_proxy.language import language_tag
# the serving rule's calibration and the policy directory have homes of their own, shared with policy/;
# re-exported because callers import them from here
from velo_proxy.calibration import serve_threshold, serving_actions  # noqa: F401
from velo_proxy.policy_dir import CURRENT, PolicyDirectory  # noqa: F401
from velo_proxy.store.base import Hit
from velo_proxy.verifier import VerifyRule

log = logging.getLogger("velo_proxy.policy")

ACTIONS = F.ACTIONS  # ("A", "B", "C")


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "A" | "B" | "C"
    entry: Hit | None  # the hit A serves or C uses as context
    probability: float  # probability that this policy (exploration included) takes this action here
    probs: tuple[float, float, float] | None = None  # the actor's (A, B, C)
    observation: F.Observation | None = None  # what the actor saw (logged as experience)
    explored: bool = False
    observed_at: float = 0.0  # the ``now`` the observation was built with
    verifier_score: float | None = None  # the verifier's score of the entry (A, C) or of the best candidate
    vetoed: bool = False  # the policy chose A and was overruled (the verifier veto, the live guard's floor)


class Policy(abc.ABC):
    version: str
    top_p: int
    verify_rule: VerifyRule | None = None  # None: decides without the pair verifier

    def to_verify(self, hits: Sequence[Hit]) -> list[int]:
        """Indices of the hits the engine should verify before ``decide``."""
        if self.verify_rule is None or not hits:
            return []
        return self.verify_rule.candidates([h.similarity for h in hits])

    @abc.abstractmethod
    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float,
               scores: dict[int, float] | None = None, request_text: str | None = None) -> Decision: ...


def _best_score(scores: dict[int, float] | None) -> float | None:
    return max(scores.values()) if scores else None


class VerifiedPolicy(Policy):
    """Serve the hit the pair verifier stands behind: among at most ``top_k`` hits above the cosine
    floor, the best-scored one when its score reaches the threshold calibrated for the operator's
    bound. Without a verifier (``rule=None``) or when it fails, nothing is served semantically."""

    def __init__(self, *, rule: VerifyRule | None, version: str, top_p: int = 5) -> None:
        self.verify_rule = rule
        self.top_p = top_p
        self.version = version

    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float,
               scores: dict[int, float] | None = None, request_text: str | None = None) -> Decision:
        if self.verify_rule is None or not scores:
            return Decision("B", None, 1.0, verifier_score=_best_score(scores))
        rule = self.verify_rule
        if rule.head != (1.0, 0.0, 0.0):  # a head recalibrated on judged traffic
            scores = {i: rule.adjusted(s, hits[i].similarity) for i, s in scores.items()}
        indices = sorted(scores)
        pick = rule.choose(indices, [scores[i] for i in indices])
        if pick is None:
            return Decision("B", None, 1.0, verifier_score=_best_score(scores))
        return Decision("A", hits[pick], 1.0, verifier_score=scores[pick])

    def to_verify(self, hits: Sequence[Hit]) -> list[int]:
        # no calibrated threshold for this bound: nothing could be served, so nothing is worth a verifier call
        if self.verify_rule is None or not np.isfinite(self.verify_rule.threshold):
            return []
        return super().to_verify(hits)


class ThresholdPolicy(Policy):
    """Serve the best hit when its cosine similarity reaches a fixed threshold; otherwise forward."""

    def __init__(self, *, threshold: float, top_p: int = 5) -> None:
        self.threshold = threshold
        self.top_p = top_p
        self.version = f"threshold-{threshold:g}"

    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float,
               scores: dict[int, float] | None = None, request_text: str | None = None) -> Decision:
        if hits and hits[0].similarity >= self.threshold:
            return Decision("A", hits[0], 1.0)
        return Decision("B", None, 1.0)


class PolicyMismatch(ValueError):
    """The policy file was built for another embedder or another feature contract."""


#: The default embedder's id (all-MiniLM-L6-v2), whose policy is ``lrs-default``.
DEFAULT_POLICY_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The LRS actor the package ships for each embedder, by embedder id: ``policies/<stem>.onnx`` (with its
#: ``.json`` sidecar and the ``.pt`` checkpoint ``velo-proxy retrain`` starts from). A policy reads the
#: vectors of one embedder, so each embedder needs its own (docs/policy.md, "One policy per embedder").
SHIPPED_POLICIES: dict[str, str] = {
    DEFAULT_POLICY_EMBEDDER_ID: "lrs-default",
    "intfloat/multilingual-e5-small-q4": "lrs-multilingual-e5-small",
}


def shipped_policy_stem(embedder_id: str) -> str:
    """The file stem of the shipped policy for ``embedder_id``; ``PolicyMismatch`` when there is none."""
    try:
        return SHIPPED_POLICIES[embedder_id]
    except KeyError:
        raise PolicyMismatch(f"the package ships no learned policy for embedder {embedder_id!r} (it ships one for "
                             f"{', '.join(sorted(SHIPPED_POLICIES))}); train one with 'python -m policy.reproduce' "
                             f"and set VELO_POLICY_PATH") from None


def default_policy_path(embedder_id: str = DEFAULT_POLICY_EMBEDDER_ID) -> Path:
    """The shipped LRS policy for ``embedder_id`` (default: the default embedder's, all-MiniLM-L6-v2)."""
    return Path(str(resources.files("velo_proxy") / "policies" / f"{shipped_policy_stem(embedder_id)}.onnx"))


class LearnedPolicy(Policy):
    """The LRS actor. ``decide``: A when P(A) reaches the calibrated threshold for the configured
    false-hit bound, else the likelier of B and C. With ``exploration_rate`` e, a random action is
    taken with probability e, and the logged probability accounts for it (off-policy correction)."""

    def __init__(self, path: Path, *, embedder_id: str, dim: int, max_false_hit_rate: float,
                 exploration_rate: float = 0.0, seed: int | None = None, version: str | None = None,
                 verify_rule: VerifyRule | None = None, veto: bool = True, verifier_sha256: str | None = None) -> None:
        import onnxruntime as ort

        # which hits the engine verifies (their scores are features); without a rule none is, and
        # with ``veto`` an A is then never served
        self.verify_rule = verify_rule
        self.veto = veto
        self.path = Path(path)
        if not self.path.exists():
            raise PolicyMismatch(f"policy file {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a refused policy, not a crash
            raise PolicyMismatch(f"policy file {self.path} is not a loadable ONNX model: {exc}") from exc
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        self._check(meta, embedder_id=embedder_id, dim=dim, verifier_sha256=verifier_sha256)
        self.top_p = int(meta["velo_top_p"])
        # a version published to a policy directory is named by the directory's pointer
        self.version = version or meta.get("velo_policy_version", self.path.stem)
        self.calibration = json.loads(meta["velo_calibration"])
        self.max_false_hit_rate = max_false_hit_rate
        self.threshold = serve_threshold(self.calibration, max_false_hit_rate)
        self.exploration_rate = exploration_rate
        self._rng = random.Random(seed)
        self._output = self.session.get_outputs()[0].name
        # the exporter drops inputs a model does not use; feed exactly the declared ones
        self._inputs = [i.name for i in self.session.get_inputs()]
        unknown = set(self._inputs) - set(F.INPUT_NAMES)
        if unknown:
            raise PolicyMismatch(f"policy expects inputs {sorted(unknown)} that velo_proxy.features does not build")

    @staticmethod
    def _check(meta: dict[str, str], *, embedder_id: str, dim: int, verifier_sha256: str | None = None) -> None:
        required = ("velo_feature_version", "velo_embedder_id", "velo_dim", "velo_top_p", "velo_k", "velo_calibration")
        missing = [k for k in required if k not in meta]
        if missing:
            raise PolicyMismatch(f"policy metadata lacks {', '.join(missing)}: not a VELO policy export")
        problems = []
        if int(meta["velo_feature_version"]) != F.FEATURE_VERSION:
            problems.append(f"feature version {meta['velo_feature_version']} != serving's {F.FEATURE_VERSION}")
        if int(meta["velo_k"]) != F.K:
            problems.append(f"K={meta['velo_k']} hit features != serving's {F.K}")
        names = meta.get("velo_hit_features")
        if names is not None and tuple(json.loads(names)) != F.HIT_FEATURE_NAMES:
            problems.append("hit feature names differ from velo_proxy.features")
        if meta["velo_embedder_id"] != embedder_id:
            problems.append(f"trained on embedder '{meta['velo_embedder_id']}', serving uses '{embedder_id}'")
        if int(meta["velo_dim"]) != dim:
            problems.append(f"D={meta['velo_dim']} != the embedder's {dim}")
        # the verifier's scores are hit features: another verifier's scores mean something else (an export
        # that does not say which verifier it learned from predates the check and is taken as it is)
        trained_with = meta.get("velo_verifier_sha256")
        if trained_with and verifier_sha256 and trained_with != verifier_sha256:
            problems.append(f"trained on the scores of verifier weights {trained_with[:12]}, serving uses "
                            f"{verifier_sha256[:12]}")
        if problems:
            raise PolicyMismatch("policy does not match this proxy: " + "; ".join(problems))

    def probs(self, observations: Sequence[F.Observation]) -> np.ndarray:
        """Action probabilities [B, 3] (A, B, C)."""
        feeds = F.stack_observations(observations)
        return self.session.run([self._output], {name: feeds[name] for name in self._inputs})[0]

    def rule(self, p: np.ndarray, has_hits: bool) -> int:
        """The shared serving rule (``velo_proxy.calibration.serving_actions``) on one row of P."""
        return int(serving_actions(np.asarray(p)[None], self.threshold, has_hits=np.array([has_hits]))[0])

    def decide(self, request_vector: np.ndarray, hits: Sequence[Hit], *, now: float,
               scores: dict[int, float] | None = None, request_text: str | None = None) -> Decision:
        # the request's language is a hit feature (feature version 3): is the cached question in another one?
        language = language_tag(request_text) if request_text else None
        observation = F.build_observation(request_vector, hits, top_p=self.top_p, now=now, scores=scores,
                                          request_language=language)
        p = self.probs([observation])[0]
        has_hits = bool(hits)
        greedy = chosen = self.rule(p, has_hits)
        explored = False
        probability = 1.0  # without hits B is the only action
        if has_hits:
            eps = self.exploration_rate
            if eps > 0 and self._rng.random() < eps:
                chosen, explored = self._rng.choice((F.ACTION_A, F.ACTION_B, F.ACTION_C)), True
            # probability of the logged action under "greedy with prob 1 - eps, uniform with prob eps"
            probability = (1 - eps) * (chosen == greedy) + eps / 3
        entry, index, vetoed = None, None, False
        if chosen in (F.ACTION_A, F.ACTION_C):
            index = F.select_entry(hits, top_p=self.top_p)
            entry = hits[index] if index is not None else None
        if chosen == F.ACTION_A and self.veto:
            # the verifier has the last word on A: an entry it did not pass is forwarded
            score = (scores or {}).get(index) if index is not None else None
            threshold = self.verify_rule.threshold if self.verify_rule is not None else float("inf")
            if score is None or score < threshold:
                chosen, entry, vetoed = F.ACTION_B, None, True
        score = (scores or {}).get(index) if index is not None and entry is not None else _best_score(scores)
        return Decision(ACTIONS[chosen], entry, float(probability), tuple(float(x) for x in p), observation, explored,
                        now, verifier_score=score, vetoed=vetoed)
