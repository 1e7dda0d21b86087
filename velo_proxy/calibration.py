"""The learned policy's serving rule and its calibration table, written once for both sides: the
proxy reads the table (``LearnedPolicy``), the training package writes it (``policy.reproduce``,
``policy.retrain``) and runs the same rule on the simulator (``policy.baselines``).

Serving rule: **A iff P(A) >= tau(delta), otherwise the more probable of B and C.** The table maps
each tabulated false-hit bound delta to its tau; the ONNX export carries it as the
``velo_calibration`` metadata (docs/policy.md):

    {"format": 1, "rule": SERVING_RULE, "default_delta": 0.02, "thresholds": {"0.02": 0.88, ...}, ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from velo_proxy import features as F

CALIBRATION_FORMAT = 1
#: The deltas a calibration tabulates.
DELTAS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
#: A tau above every probability: "never serve from the cache" (no tabulated delta is low enough, or
#: no candidate threshold met the bound).
NEVER_SERVE = 1.01
SERVING_RULE = "serve A iff action_probs[A] >= thresholds[delta]; otherwise the more probable of B and C"
#: z of a one-sided 95 % bound (every bound in the project: calibrations, the live guard)
Z_95 = 1.645


def wilson_upper(wrong: float, n: float, z: float = Z_95) -> float:
    """One-sided 95 % upper confidence bound (Wilson score) of a rate observed as ``wrong`` of ``n``;
    1 when nothing was observed."""
    if n <= 0:
        return 1.0
    p = wrong / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    rad = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(min(1.0, (centre + rad) / den))


def calibrate(scores: np.ndarray, relevant: np.ndarray, deltas=DELTAS) -> dict[str, float]:
    """For each delta the smallest tau such that, among the labelled decisions with score >= tau, the
    one-sided 95 % upper bound of the wrong share is <= delta (tau = NEVER_SERVE when none is). Scores
    are the learned policy's P(A) or the pair verifier's score; ``relevant`` is 1 where serving is right."""
    scores, relevant = np.asarray(scores, dtype=np.float64), np.asarray(relevant, dtype=np.float64)
    order = np.argsort(-scores)
    p_sorted, wrong = scores[order], 1.0 - relevant[order]
    cum_wrong = np.cumsum(wrong)
    out = {}
    for d in deltas:
        tau = NEVER_SERVE
        for n in range(len(p_sorted), 0, -1):
            # serving the top-n by score: threshold at p_sorted[n-1]; ties make the set larger, be safe
            if n < len(p_sorted) and p_sorted[n] == p_sorted[n - 1]:
                continue
            if wilson_upper(cum_wrong[n - 1], n) <= d:
                tau = float(p_sorted[n - 1])
                break
        out[delta_key(d)] = tau
    return out


def delta_key(delta: float) -> str:
    """How a delta is written as a key of the ``thresholds`` table."""
    return f"{delta:g}"


def threshold_for_bound(thresholds: dict[str, float], max_false_hit_rate: float, *, none: float) -> float:
    """The threshold tabulated for the largest delta not above the operator's bound (conservative: a
    bound between two calibrated deltas uses the stricter one); ``none`` when every tabulated delta is
    above the bound. The one reading of a calibration table, for the learned policy's P(A) table and
    the pair verifier's score table alike."""
    rows = sorted((float(delta), float(threshold)) for delta, threshold in thresholds.items())
    eligible = [threshold for delta, threshold in rows if delta <= max_false_hit_rate + 1e-12]
    return eligible[-1] if eligible else none


def serve_threshold(calibration: dict[str, Any], max_false_hit_rate: float) -> float:
    """The P(A) threshold for the operator's bound (``threshold_for_bound``; stricter than anything
    calibrated: ``NEVER_SERVE``). ``calibration`` is the export's ``velo_calibration`` JSON:
    ``{"thresholds": {"0.02": 0.88, ...}, ...}``."""
    return threshold_for_bound(calibration["thresholds"], max_false_hit_rate, none=NEVER_SERVE)


def serving_actions(probs: np.ndarray, tau: float | None, *, has_hits: np.ndarray | None = None) -> np.ndarray:
    """The serving rule on action probabilities ``[B, 3]`` (A, B, C): A iff P(A) >= ``tau``, else the
    more probable of B and C (ties go to B); ``tau=None`` is plain argmax. A row without hits
    (``has_hits`` False) can only forward."""
    probs = np.asarray(probs)
    if tau is None:
        actions = np.argmax(probs, axis=1)
    else:
        b_or_c = np.where(probs[:, F.ACTION_C] > probs[:, F.ACTION_B], F.ACTION_C, F.ACTION_B)
        actions = np.where(probs[:, F.ACTION_A] >= tau, F.ACTION_A, b_or_c)
    if has_hits is not None:
        actions = np.where(np.asarray(has_hits, dtype=bool), actions, F.ACTION_B)
    return actions


def calibration_record(thresholds: dict[str, float], *, default_delta: float, **extra: Any) -> dict[str, Any]:
    """The ``velo_calibration`` document of an export: the rule, the table, and whatever the writer
    adds about how the table was measured."""
    return {"format": CALIBRATION_FORMAT, "rule": SERVING_RULE, "default_delta": default_delta,
            "thresholds": dict(thresholds), **extra}

