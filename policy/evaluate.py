"""Run a decision rule on the simulator and measure it.

Metrics, per request answered to a user (nearest mode: every agent decision; all-edges mode: one per
request, the fastest agent's answer):
- reward (Eq. 11), satisfaction q (Eq. 2), delay d (s);
- llm_freq: share of agent decisions that forward the request as is (B) — the paper's "LLM direct
  request frequency";
- c_freq: share of agent decisions that augment (C);
- hit_rate: share of requests answered from a cache (A);
- false_hit_rate: wrong cache answers / cache answers (a hit whose entry is not a true duplicate).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

# the bound and the threshold search are the serving side's too (the live guard, the verifier's recalibration)
from velo_proxy.calibration import DELTAS, NEVER_SERVE, calibrate, delta_key, wilson_upper  # noqa: F401

from .data import Dataset
from .sim import A, B, C, EdgeSim, SimConfig


def evaluate(data: Dataset, policy, cfg: SimConfig, steps: int, *, seed: int = 12345, record=None) -> dict:
    """Evaluate ``policy`` for ``steps`` steps from empty caches (one long episode)."""
    cfg = replace(cfg, episode_len=steps + 1, seed=seed)
    sim = EdgeSim(data, cfg)
    obs = sim.reset()
    tot = {k: 0.0 for k in ("reward", "q", "delay", "hit", "false_hit", "n", "B", "C", "dec")}
    for _ in range(steps):
        acts, entries = policy.act(sim, obs)
        if record is not None:
            record(sim, obs, acts)
        _, info, _, obs = sim.step(acts, entries, exact_tier=getattr(policy, "uses_cache", True))
        m = info.answered > 0
        tot["reward"] += float(info.reward[m].sum())
        tot["q"] += float(info.q[m].sum())
        tot["delay"] += float(info.delay[m].sum())
        tot["hit"] += float(info.hit[m].sum())
        tot["false_hit"] += float(info.false_hit[m].sum())
        tot["n"] += float(m.sum())
        tot["B"] += float((info.action == B).sum())
        tot["C"] += float((info.action == C).sum())
        tot["dec"] += float(len(info.action))
    n = max(tot["n"], 1.0)
    return {
        "reward": tot["reward"] / n,
        "satisfaction": tot["q"] / n,
        "delay": tot["delay"] / n,
        "llm_freq": tot["B"] / max(tot["dec"], 1.0),
        "c_freq": tot["C"] / max(tot["dec"], 1.0),
        "hit_rate": tot["hit"] / n,
        "false_hit_rate": tot["false_hit"] / max(tot["hit"], 1.0),
        "hits": tot["hit"],
        "requests": n,
    }


def collect_calibration(data: Dataset, policy, cfg: SimConfig, steps: int, *, seed: int = 777, driver=None) -> dict:
    """Run ``driver`` (default: ``policy``, argmax) and record, for every decision with a semantic hit
    (not the exact tier), ``policy``'s P(A), the Eq. 4 entry's similarity and verifier score (NaN when not
    verified), whether it is a true duplicate and the request's source; ``metrics`` is the run's ``evaluate`` result."""
    rec: dict[str, list] = {"p_a": [], "similarity": [], "relevant": [], "source": [], "verifier": []}

    def record(sim: EdgeSim, obs, acts):
        p = policy.probs(obs)
        for i in range(sim.N):
            j = sim.sel[i]
            if j is not None and sim.exact[i] is None:  # the exact tier is not the policy's call
                rec["p_a"].append(float(p[i, A]))
                rec["similarity"].append(sim.hits[i][j].similarity)
                rec["relevant"].append(float(sim.servable(i, j)))  # its cluster, in the request's language
                rec["source"].append(int(data.c_source[sim.requests[i]["cluster"]]))
                rec["verifier"].append(float(sim.scores[i].get(j, np.nan)))  # NaN: the entry was not verified

    metrics = evaluate(data, driver or policy, cfg, steps, seed=seed, record=record)
    return {**{k: np.array(v) for k, v in rec.items()}, "metrics": metrics}


def evaluate_seeds(data: Dataset, policy, cfg: SimConfig, steps: int, seeds=(2024, 2025, 2026)) -> dict:
    """``evaluate`` averaged over several stream seeds (each seed has its own popularity order, so a
    few popular near-miss groups do not decide the ranking); adds ``reward_sd`` across seeds and
    ``reward_seeds``, the reward per seed (for paired comparisons: every method sees the same streams)."""
    ms = [evaluate(data, policy, cfg, steps, seed=s) for s in seeds]
    out = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
    out["hits"] = float(sum(m["hits"] for m in ms))
    out["requests"] = float(sum(m["requests"] for m in ms))
    wrong = sum(m["false_hit_rate"] * m["hits"] for m in ms)
    out["false_hit_rate"] = wrong / max(out["hits"], 1.0)
    out["reward_sd"] = float(np.std([m["reward"] for m in ms]))
    out["reward_seeds"] = [float(m["reward"]) for m in ms]
    return out


def paired_difference(a: dict, b: dict) -> dict:
    """Reward of ``a`` minus that of ``b`` (``evaluate_seeds`` results on the same seeds), seed by seed:
    mean, its standard error, and on how many seeds ``a`` is ahead. The streams' difficulty differs
    far more between seeds than the methods do, so the paired difference is the firm comparison."""
    d = np.asarray(a["reward_seeds"]) - np.asarray(b["reward_seeds"])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "ahead": int((d > 0).sum()), "seeds": int(len(d))}


def calibrate_rules(scores: dict[float, dict], deltas=DELTAS) -> tuple[dict[str, float], list]:
    """Calibration of the serving rule "A iff P(A) >= tau": ``scores`` maps candidate tau to the metrics
    of that rule run on validation (``evaluate_seeds``). For each delta, the smallest tau (the most
    serving) whose false-hit rate — wrong cache answers / all cache answers — has a one-sided 95 %
    Wilson upper bound <= delta. Returns ({delta: tau}, table of the candidates)."""
    table = []
    for t in sorted(scores):
        m = scores[t]
        wrong = m["false_hit_rate"] * m["hits"]
        table.append({"tau": float(t), "reward": m["reward"], "hit_rate": m["hit_rate"], "false_hit_rate": m["false_hit_rate"],
                      "hits": int(m["hits"]), "false_hit_upper95": wilson_upper(wrong, m["hits"])})
    out = {}
    for d in deltas:
        ok = [r["tau"] for r in table if r["false_hit_upper95"] <= d]
        out[delta_key(d)] = min(ok) if ok else NEVER_SERVE
    return out, table


def quantile_thresholds(p_a: np.ndarray, qs) -> list[float]:
    """Candidate thresholds on P(A): quantiles of the observed P(A), rounded *down* to 4 decimals so that
    "P(A) >= tau" keeps the decisions at the quantile (rounded to nearest, P(A) = 0.99996 gave tau = 1.0,
    and a policy that serves everything at w = 1 was calibrated to serve nothing)."""
    if len(p_a) == 0:
        return []
    return sorted({float(np.floor(q * 1e4) / 1e4) for q in np.quantile(p_a, qs)})
