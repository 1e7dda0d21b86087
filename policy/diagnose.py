"""How does a trained actor decide semantic hits, against the cosine? (docs/policy.md, "Status")

    python -m policy.diagnose ~/.cache/velo-proxy/sim/runs/full/lrs-w0.1.pt
    python -m policy.diagnose --rules ~/.cache/velo-proxy/sim/runs/full/{lrs,g-mappo}-w0.1.pt

Ranking (default): runs the static 0.90 threshold on the test stream seeds (a neutral cache history)
and records, for every decision with a semantic hit (not the exact tier), the actor's P(A), the Eq. 4
entry's cosine and whether that entry is a true duplicate; prints ROC AUC per source and right answers
among the top k.

``--languages``: what the actor does with a hit cached in another language (feature version 3): on the
test streams, every decision whose Eq. 4 entry is a question cached in another language, split by whether
that entry is the same question (its translation, the oracle's C) or another one; the actor's action under
its calibrated rules next to the oracle's (the best action knowing the LLM's answer) and the expert's.

    python -m policy.diagnose --languages ~/.cache/velo-proxy/sim/runs/full/lrs-w0.1.pt

``--rules``: each actor's test reward (N = 3, nearest edge) under the argmax and under the threshold
rule on P(A) calibrated on validation exactly as the shipped policy is (``reproduce.calibrate_actor``):
does an actor gain from LRS's serving rule? Every checkpoint after the first is also compared with the
first seed by seed (same test streams: paired difference +- its standard error).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np


def roc_auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counted half."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def ranking(data, actor, cfg) -> None:
    from .baselines import NeuralPolicy, StaticThreshold
    from .data import SOURCES
    from .evaluate import collect_calibration
    from .reproduce import SEEDS

    recs = [collect_calibration(data, NeuralPolicy(actor, "actor"), cfg, 500, seed=s, driver=StaticThreshold(0.9))
            for s in SEEDS]
    r = {k: np.concatenate([x[k] for x in recs]) for k in ("p_a", "similarity", "relevant", "source", "verifier")}
    rel = r["relevant"] > 0
    print(f"{len(rel)} semantic decisions, {int(rel.sum())} with a true duplicate")
    for src in (None, *np.unique(r["source"])):
        m = np.ones(len(rel), bool) if src is None else r["source"] == src
        if 0 < rel[m].sum() < m.sum():
            print(f"{'all' if src is None else SOURCES[src]:7s} n={m.sum():5d} right={int(rel[m].sum()):4d} "
                  f"AUC P(A) {roc_auc_score(rel[m], r['p_a'][m]):.3f}  AUC cosine {roc_auc_score(rel[m], r['similarity'][m]):.3f}"
                  f"  AUC verifier {roc_auc_score(rel[m], np.nan_to_num(r['verifier'][m], nan=-1.0)):.3f} "
                  f"({int(np.isfinite(r['verifier'][m]).sum())} verified)")
    r["verifier"] = np.nan_to_num(r["verifier"], nan=-1.0)  # an unverified entry ranks below every verified one
    for name in ("p_a", "similarity", "verifier"):
        top = rel[np.argsort(-r[name], kind="stable")]
        print(f"right among the top 50/100/150/200 by {name}: {[int(top[:k].sum()) for k in (50, 100, 150, 200)]}")


def rules(data, name: str, actor, cfg) -> dict:
    """Test reward of the actor under the argmax and its calibrated rules; returns the results by rule."""
    from .baselines import NeuralPolicy
    from .evaluate import evaluate_seeds
    from .reproduce import SEEDS, calibrate_actor

    cal = calibrate_actor(data, actor, replace(cfg, split="val"), 500)
    out = {}
    for rule, label, tau in (("argmax", "argmax", None),
                             ("reward", f"reward tau {cal['reward_threshold']:.4f}", cal["reward_threshold"]),
                             ("delta", f"delta 0.02 tau {cal['thresholds']['0.02']:.4f}", cal["thresholds"]["0.02"])):
        m = out[rule] = evaluate_seeds(data, NeuralPolicy(actor, name, tau=tau), cfg, 500, SEEDS)
        print(f"{name:24s} {label:24s} reward {m['reward']:.3f} (sd {m['reward_sd']:.3f}) hit {m['hit_rate']:.3f} "
              f"false hit {m['false_hit_rate']:.3f}")
    return out


def languages(data, name: str, actor, cfg, *, steps: int = 500, seeds=None) -> dict:
    """Action shares on decisions whose Eq. 4 entry is cached in another language (see the module text)."""
    from .baselines import NeuralPolicy
    from .evaluate import evaluate
    from .reproduce import SEEDS, calibrate_actor
    from .sim import A, B, C

    cal = calibrate_actor(data, actor, replace(cfg, split="val"), steps)
    rules = {"reward τ": cal["reward_threshold"], "δ = 2 %": cal["thresholds"].get("0.02"),
             "δ = 10 %": cal["thresholds"].get("0.1")}
    out: dict = {"decisions": {}, "rules": {k: (None if v is None else float(v)) for k, v in rules.items()}}
    for label, tau in rules.items():
        counts: dict[str, np.ndarray] = {}

        def record(sim, obs, acts):
            oracle = np.argmax(sim.action_rewards(), axis=1)
            expert = sim.expert_actions()
            for i in range(sim.N):
                j = sim.sel[i]
                if j is None or sim.exact[i] is not None or not sim.cross_language(i, j):
                    continue
                same = sim.hits[i][j].entry.cluster == sim.requests[i]["cluster"]
                key = "same question" if same else "another question"
                c = counts.setdefault(key, np.zeros((3, 3), dtype=np.int64))  # rows: actor, oracle, expert
                c[0, int(acts[i])] += 1
                c[1, int(oracle[i])] += 1
                c[2, int(expert[i])] += 1

        for seed in seeds or SEEDS:
            evaluate(data, NeuralPolicy(actor, name, tau=tau), cfg, steps, seed=seed, record=record)
        out["decisions"][label] = {k: v.tolist() for k, v in counts.items()}
        for key, c in sorted(counts.items()):
            n = int(c[0].sum())
            shares = lambda row: " ".join(f"{a} {row[k] / max(n, 1):.0%}" for k, a in ((A, "A"), (B, "B"), (C, "C")))  # noqa: E731
            print(f"{name} [{label}] cross-language entry, {key}: {n} decisions; actor {shares(c[0])}; "
                  f"oracle {shares(c[1])}; expert {shares(c[2])}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--rules", action="store_true", help="test reward under the argmax and the calibrated rules")
    ap.add_argument("--languages", action="store_true",
                    help="actions on hits cached in another language, next to the oracle's and the expert's")
    ap.add_argument("--w", type=float, default=0.1)
    a = ap.parse_args(argv)
    import torch

    from .data import DataSpec, cache_dir
    from .reproduce import _dataset
    from .sim import SimConfig
    from .train import load_actor

    torch.set_num_threads(1)
    data, _ = _dataset(DataSpec(), cache_dir() / "runs")
    base = SimConfig()
    cfg = replace(base, split="test", qos=replace(base.qos, w=a.w))
    from .evaluate import paired_difference

    first = None
    for path in a.checkpoints:
        actor = load_actor(path)[0]
        if a.languages:
            languages(data, f"{path.parent.name}/{path.stem}", actor, cfg)
            continue
        if not a.rules:
            ranking(data, actor, cfg)
            continue
        name = f"{path.parent.name}/{path.stem}"
        res = rules(data, name, actor, cfg)
        if first is None:
            first = (name, res)
            continue
        for rule in ("argmax", "reward"):  # seed by seed against the first checkpoint's same rule
            d = paired_difference(res[rule], first[1][rule])
            print(f"{name} - {first[0]} ({rule}): {d['mean']:+.4f} +- {d['se']:.4f} (SE), ahead on "
                  f"{d['ahead']}/{d['seeds']} streams")


if __name__ == "__main__":
    main()
