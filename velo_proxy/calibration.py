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

