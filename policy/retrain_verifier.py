"""Recalibrate the pair verifier on what the proxies judged, and publish it only if it is better.

    velo-proxy retrain --labels /var/lib/velo/data/judged/labels.jsonl --policy-dir /var/lib/velo/policies
    velo-proxy retrain --redis-url redis://...   # the labels stream every proxy appends to

Reads top to bottom:

1. read the judged pairs (``velo_proxy.labels``: shadow checks of served hits and near-miss reviews,
   each a (new question, cached question, similarity, verdict)); the newest verdict of a pair wins;
2. score every pair with the installed verifier (the one the proxies run, onnxruntime, no torch), so
   labels from any policy or verifier version are on one scale;
3. split by the new question (stable hash, so a question's pairs stay on one side): 50 % fit, 25 %
   calibrate, 25 % test;
4. fit the output head on the fit split: sigmoid(a * logit(score) + b * cosine + c), a logistic
   regression pulled towards the current head (L2, ``l2``), so a few labels move it a little and many
   move it far. The current head (identity for the shipped verifier) is what the package's training
   data made; it is the prior the labels update;
5. recalibrate: for each tabulated delta, the smallest threshold whose served pairs on the calibrate
   split keep the one-sided 95 % upper bound of the wrong share <= delta (``velo_proxy.calibration``);
6. compare candidate and current on the test split at the operator's bound by the net value of what
   each serves: right hits minus wrong hits weighted (1 - delta) / delta, the weight at which a set of
   hits at exactly the bound is worth nothing. Publish (``PolicyDirectory.publish_verifier_recalibration``)
   only when the candidate's net value is higher; otherwise keep the current one and say why.

The verified policy of every proxy watching the policy directory swaps the new head and thresholds in
without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from velo_proxy.calibration import DELTAS, calibrate, delta_key, threshold_for_bound, wilson_upper
from velo_proxy.judging import Label
from velo_proxy.policy_dir import PolicyDirectory
from velo_proxy.verifier import IDENTITY_HEAD, PairVerifier, head_score, recalibration_applies

log = logging.getLogger("policy.retrain_verifier")


@dataclass
class VerifierRetrainConfig:
    """What one recalibration reads and how it decides."""

    policy_dir: Path
    """Where the recalibration is published; the proxies watch it."""
    verifier_dir: Path
    """The installed pair verifier (VELO_VERIFIER_DIR): the one the proxies run."""
    embedder_id: str
    """The proxies' embedder: only its judged pairs are read (their similarities are its cosines), the
    verifier's calibration block for it is the prior, and the record is published for it alone."""
    max_false_hit_rate: float = 0.02
    """The operator's bound delta at which candidate and current are compared."""
    min_labels: int = 60
    """Fewer distinct judged pairs than this: nothing is fitted (too little to hold out)."""
    l2: float = 1.0
    """Strength of the pull of the head's parameters towards the current head."""
    iterations: int = 50
    """Newton steps of the head's fit (it converges in a handful)."""
    margin: float = 0.0
    """The candidate must beat the current net value by more than this on the test split."""
    deltas: Sequence[float] = field(default_factory=lambda: DELTAS)
    """The bounds the published table tabulates."""


def split_of(question: str) -> str:
    """"fit" (50 %), "calibrate" (25 %) or "test" (25 %), stable per new question."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16) % 4
    return "fit" if bucket < 2 else ("calibrate" if bucket == 2 else "test")


def distinct_pairs(labels: Sequence[Label]) -> list[Label]:
    """One label per (new question, cached question): the newest verdict."""
    newest: dict[tuple[str, str], Label] = {}
    for label in sorted(labels, key=lambda lb: lb.ts):
        newest[(label.question, label.cached_question)] = label
    return list(newest.values())


def features(scores: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """[logit(score), cosine, 1] per pair: the head's inputs."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.stack([np.log(p / (1 - p)), np.asarray(similarity, dtype=np.float64), np.ones(len(p))], axis=1)


def fit_head(x: np.ndarray, y: np.ndarray, *, prior: Sequence[float], l2: float, iterations: int) -> np.ndarray:
    """Logistic regression of ``y`` on ``x`` with an L2 pull towards ``prior`` (Newton's method)."""
    theta = np.asarray(prior, dtype=np.float64).copy()
    prior_arr = theta.copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (p - y) + l2 * (theta - prior_arr)
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return theta


def net_value(scores: np.ndarray, correct: np.ndarray, threshold: float, delta: float) -> dict[str, Any]:
    """What serving pairs with score >= threshold would have done on labelled pairs."""
    served = scores >= threshold
    right = int(np.count_nonzero(served & correct))
    wrong = int(np.count_nonzero(served & ~correct))
    hits = right + wrong
    return {"threshold": float(threshold), "served": hits, "right": right, "wrong": wrong,
            "false_hit_rate": wrong / hits if hits else None, "false_hit_upper95": wilson_upper(wrong, hits),
            "recall": right / max(1, int(np.count_nonzero(correct))),
            "net": right - wrong * (1 - delta) / delta}


def current_recalibration(directory: PolicyDirectory, verifier: PairVerifier) -> dict[str, Any]:
    """The head and thresholds the proxies use now: the published recalibration of this verifier with this
    embedder, else the verifier's own calibration for the embedder with the identity head."""
    record = directory.verifier_recalibration()
    if record is not None and recalibration_applies(record, verifier):
        return record
    cal = verifier.calibration
    return {"version": f"{verifier.id}-shipped", "head": list(IDENTITY_HEAD), "thresholds": cal.get("thresholds", {}),
            "cosine_floor": cal.get("cosine_floor", 0.75), "top_k": cal.get("top_k", 3)}


def run(cfg: VerifierRetrainConfig, labels: Sequence[Label]) -> dict[str, Any]:
    t0 = time.time()
    report: dict[str, Any] = {"published": False, "labels": len(labels), "embedder": cfg.embedder_id}
    directory = PolicyDirectory(cfg.policy_dir)
    # A similarity is a cosine of one embedder's space (e5's unrelated pairs score ~0.8, MiniLM's ~0.2):
    # a head and a floor fitted on another embedder's pairs would misread this one's.
    own = [lb for lb in labels if lb.embedder == cfg.embedder_id]
    report["labels_of_other_embedders"] = len(labels) - len(own)
    pairs = distinct_pairs(own)
    report["pairs"] = len(pairs)
    if len(pairs) < cfg.min_labels:
        report["reason"] = f"only {len(pairs)} distinct judged pairs (< {cfg.min_labels})"
        return report

    # 2. one scale: the installed verifier's scores
    verifier = PairVerifier(cfg.verifier_dir, embedder_id=cfg.embedder_id)
    if verifier.embedder_id != cfg.embedder_id:
        verifier.close()
        report["reason"] = (f"the verifier {verifier.id} has no calibration for embedder {cfg.embedder_id} "
                            f"(only {verifier.embedder_id})")
        return report
    try:
        raw = verifier.score_many([lb.question for lb in pairs], [lb.cached_question for lb in pairs])
    finally:
        verifier.close()
    sim = np.array([lb.similarity for lb in pairs], dtype=np.float64)
    correct = np.array([bool(lb.correct) for lb in pairs])
    split = np.array([split_of(lb.question) for lb in pairs])
    report["split"] = {name: {"pairs": int(np.count_nonzero(split == name)),
                              "right": int(np.count_nonzero(correct & (split == name)))}
                       for name in ("fit", "calibrate", "test")}
    report["kinds"] = {kind: sum(1 for lb in pairs if lb.kind == kind) for kind in ("shadow", "near_miss")}
    if min(v["pairs"] for v in report["split"].values()) == 0:
        report["reason"] = "a split is empty"
        return report

    # 3-4. the head, fitted on the fit split only
    current = current_recalibration(directory, verifier)
    x = features(raw, sim)
    fit = split == "fit"
    head = fit_head(x[fit], correct[fit].astype(np.float64), prior=current["head"], l2=cfg.l2,
                    iterations=cfg.iterations)
    candidate_scores = head_score(head, raw, sim)
    current_scores = head_score(current["head"], raw, sim)

    # 5. thresholds on the calibrate split
    cal = split == "calibrate"
    thresholds = calibrate(candidate_scores[cal], correct[cal].astype(np.float64), deltas=cfg.deltas)

    # 6. both on the test split, at the operator's bound
    test, delta = split == "test", cfg.max_false_hit_rate
    inf = float("inf")
    results = {
        "current": net_value(current_scores[test], correct[test],
                             threshold_for_bound(current["thresholds"], delta, none=inf), delta),
        "candidate": net_value(candidate_scores[test], correct[test],
                               threshold_for_bound(thresholds, delta, none=inf), delta),
    }
    report.update(current=current["version"], head=[round(float(v), 6) for v in head], thresholds=thresholds,
                  evaluation=results)
    if not results["candidate"]["net"] > results["current"]["net"] + cfg.margin:
        report["reason"] = (f"not better on the held-out judged pairs (net {results['candidate']['net']:.2f} vs "
                            f"{results['current']['net']:.2f} at delta {delta:g})")
        return report

    version = time.strftime("vcal-%Y%m%dT%H%M%SZ", time.gmtime())
    record = {"version": version, "verifier_id": verifier.id, "embedder_id": cfg.embedder_id,
              "head": [float(v) for v in head], "thresholds": thresholds,
              "cosine_floor": current.get("cosine_floor", 0.75), "top_k": current.get("top_k", 3),
              "default_delta": delta, "published_at": time.time(), "recalibrated_from": current["version"],
              "trained_on": {"split": report["split"], "kinds": report["kinds"]}, "evaluation": results,
              "deltas": [delta_key(d) for d in cfg.deltas]}
    directory.publish_verifier_recalibration(record)
    report.update(published=True, version=version, seconds=round(time.time() - t0, 1))
    return report
