"""Labelled pairs for the pair verifier, and the stream-shaped workloads it is calibrated on.

Every text here comes from *training-only* data (the benchmarks leave all of it out, see
``verifier_texts``):

- QQP: the rows both of whose texts the LRS simulator trains on (``policy.data`` train and pairs
  splits) are training pairs; the simulator's validation rows plus ``qqp_calibration_rows`` rows that
  share no text with the simulator are the calibration set;
- PAWS-Wiki dev: split by connected component of texts (no sentence in two parts) into training,
  calibration and a held-out part that only the benchmark reads;
- STS-B train (English): a score >= ``sts_positive`` is the same request, a score in
  ``sts_negative`` is a related but different one;
- hard negatives mined with the embedder: each training question's nearest training question of
  another cluster (QQP has unlabelled duplicates, so a few of these are wrong labels);
- rule-made near misses of training questions (``policy.near_miss``) against the question and its
  labelled paraphrases, and rule-made surface rewrites as positives.

A calibration *workload* has the shape of ``benchmarks/quality.py``'s: distinct texts in a random
order, clustered (duplicates joined transitively), the first arrival of each cluster a negative,
labelled near misses interleaved.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policy import data as D
from policy.near_miss import direction_pairs, near_misses, surface_rewrite, swap_direction


@dataclass
class VerifierDataSpec:
    """Which training-only pairs the verifier learns from and is calibrated on."""

    paws_shares: tuple[float, float] = (0.45, 0.15)
    """Share of PAWS-Wiki dev components for training and for calibration; the rest is held out for
    the benchmark."""
    qqp_calibration_rows: int = 6000
    """QQP rows sharing no text with the LRS simulator, set aside for calibration (and so left out of
    the benchmark)."""
    sts_positive: float = 4.6
    """STS-B train score from which two sentences count as the same request."""
    sts_negative: tuple[float, float] = (1.5, 3.8)
    """STS-B train scores of related but different sentences (negatives)."""
    mined_negatives: int = 5000
    """Hard negatives mined with the embedder (nearest training question of another cluster)."""
    mining_pool: int = 12000
    """Training questions searched for those neighbours (embedding them all would cost minutes)."""
    rule_texts: int = 6000
    """Training questions that get rule-made near misses (each with every rule that applies)."""
    surface_positives: int = 3000
    """Rule-made surface rewrites (positives)."""
    direction_pairs: int = 2000
    """Template pairs where only the order of two ends changes (near misses) or the wording does
    (paraphrases), ``policy.near_miss.direction_pairs``: never capped, since direction is what the
    labelled data teaches least."""
    max_train_pairs: int | None = 26000
    """Cap on the other training pairs (a random subset): what one hour on two cores affords;
    None = all."""
    seed: int = 0
    """Sampling seed."""

    @classmethod
    def tiny(cls) -> "VerifierDataSpec":
        return cls(qqp_calibration_rows=80, mined_negatives=60, mining_pool=200, rule_texts=60,
                   surface_positives=30, direction_pairs=20, max_train_pairs=160)


@dataclass
class Pair:
    a: str
    b: str
    label: int  # 1 = the same request (b's answer answers a)
    source: str  # qqp | paws | sts | mined | rule:<kind> | surface


@dataclass
class CalibrationWorkload:
    """A stream: ``texts`` in arrival order, ``cluster`` per text, ``neg_edges`` labelled near-miss
    cluster pairs (for the report)."""

    name: str
    texts: list[str]
    cluster: np.ndarray
    neg_edges: set[tuple[int, int]] = field(default_factory=set)
    # "all": clusters and "not duplicate" labels from QQP (both noisy); "clusters": QQP clusters, but every
    # "not duplicate" edge a rule-made near miss (right by construction); "": complete, right labels
    qqp_labels: str = ""


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _clean(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        a, b = r["q1"].strip(), r["q2"].strip()
        if a and b and a != b:
            out.append({**r, "q1": a, "q2": b})
    return out


def _components(rows: list[dict]) -> list[list[int]]:
    """Row indices grouped by connected component of their texts."""
    uf = D._UF()
    for r in rows:
        uf.union(r["q1"], r["q2"])
    comps: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        comps.setdefault(uf.find(r["q1"]), []).append(i)
    return [comps[k] for k in sorted(comps)]


def paws_split(spec: VerifierDataSpec, root: Path | None = None) -> dict[str, list[dict]]:
    """PAWS-Wiki dev rows: ``train``, ``calibration`` and ``heldout`` (the benchmark's)."""
    rows = _clean(_rows(D._require((root or D.data_dir()) / "pairs" / "paws-wiki-dev.jsonl")))
    comps = _components(rows)
    random.Random(spec.seed + 11).shuffle(comps)
    n = sum(len(c) for c in comps)
    out: dict[str, list[dict]] = {"train": [], "calibration": [], "heldout": []}
    done = 0
    for comp in comps:
        share = done / n
        part = "train" if share < spec.paws_shares[0] else (
            "calibration" if share < spec.paws_shares[0] + spec.paws_shares[1] else "heldout")
        out[part] += [rows[i] for i in comp]
        done += len(comp)
    return out


def qqp_split(spec: VerifierDataSpec, sim_spec: D.DataSpec | None = None,
              root: Path | None = None) -> dict[str, list[dict]]:
    """QQP rows: ``train`` (both texts in the simulator's training texts) and ``calibration``
    (both in its validation split, plus ``qqp_calibration_rows`` rows that share no text with it)."""
    col = D.collect_texts(sim_spec or D.DataSpec())
    by_split: dict[int, set[str]] = {}
    for c in col["clusters"]:
        if c["source"] == "qqp":
            by_split.setdefault(c["split"], set()).update(c["members"])
    train = by_split.get(D.SPLITS.index("train"), set()) | by_split.get(D.SPLITS.index("pairs"), set())
    val = by_split.get(D.SPLITS.index("val"), set())
    sim_all = set().union(*by_split.values()) if by_split else set()
    rows = _clean(_rows(D._require((root or D.data_dir()) / "pairs" / "qqp-dev.jsonl")))
    out = {"train": [r for r in rows if r["q1"] in train and r["q2"] in train],
           "calibration": [r for r in rows if r["q1"] in val and r["q2"] in val]}
    free = [r for r in rows if r["q1"] not in sim_all and r["q2"] not in sim_all]
    rng = random.Random(spec.seed + 12)
    out["calibration"] += rng.sample(free, min(spec.qqp_calibration_rows, len(free)))
    return out


def sts_pairs(spec: VerifierDataSpec, root: Path | None = None) -> list[Pair]:
    rows = D._read_sts(D._require((root or D.data_dir()) / "sts" / "stsb-en-train.csv"))
    out = []
    for a, b, score in rows:
        if not a or not b or a == b:
            continue
        if score >= spec.sts_positive:
            out.append(Pair(a, b, 1, "sts"))
        elif spec.sts_negative[0] <= score <= spec.sts_negative[1]:
            out.append(Pair(a, b, 0, "sts"))
    return out


def _clusters_of(rows: list[dict]) -> dict[str, int]:
    uf = D._UF()
    for r in rows:
        uf.find(r["q1"]), uf.find(r["q2"])
        if int(r["duplicate"]) == 1:
            uf.union(r["q1"], r["q2"])
    roots: dict[str, int] = {}
    return {t: roots.setdefault(uf.find(t), len(roots)) for t in sorted(uf.p)}


def mine_negatives(rows: list[dict], count: int, *, pool: int, embedder=None, seed: int = 0,
                   progress: bool = True) -> list[Pair]:
    """For training questions, the nearest question (MiniLM cosine) of another cluster among ``pool``
    training questions."""
    if count <= 0 or not rows:
        return []
    cluster = _clusters_of(rows)
    rng = np.random.default_rng(seed)
    texts = sorted(cluster)
    texts = [texts[i] for i in sorted(rng.choice(len(texts), size=min(pool, len(texts)), replace=False))]
    emb, _ = D.embed_texts(texts, embedder, progress=progress)
    cl = np.array([cluster[t] for t in texts])
    picked = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
    out = []
    for start in range(0, len(picked), 1024):
        idx = picked[start:start + 1024]
        sims = emb[idx] @ emb.T
        sims[cl[idx][:, None] == cl[None, :]] = -2.0  # same cluster (itself included)
        best = np.argmax(sims, axis=1)
        for i, j in zip(idx.tolist(), best.tolist()):
            out.append(Pair(texts[i], texts[j], 0, "mined"))
    return out


def rule_pairs(rows: list[dict], spec: VerifierDataSpec) -> list[Pair]:
    """Near misses of training questions (vs the question and vs its labelled paraphrases) and
    surface rewrites (positives)."""
    rng = random.Random(spec.seed + 13)
    partners: dict[str, list[str]] = {}
    for r in rows:
        if int(r["duplicate"]) == 1:
            partners.setdefault(r["q1"], []).append(r["q2"])
            partners.setdefault(r["q2"], []).append(r["q1"])
    texts = sorted({t for r in rows for t in (r["q1"], r["q2"])})
    rng.shuffle(texts)
    out: list[Pair] = []
    made = 0
    for t in texts:
        if made >= spec.rule_texts:
            break
        edits = near_misses(t, rng)
        if not edits:
            continue
        made += 1
        for kind, edited in edits:
            if kind == "direction":
                continue  # every direction swap is added below
            out.append(Pair(t, edited, 0, f"rule:{kind}"))
            if t in partners:  # a paraphrase of the question vs the edit: still a near miss
                out.append(Pair(rng.choice(partners[t]), edited, 0, f"rule:{kind}"))
    # direction swaps are rare: every training question that has one gives it (not only the sampled ones)
    for t in texts:
        swapped = swap_direction(t, rng)
        if swapped:
            out.append(Pair(t, swapped, 0, "rule:direction"))
            if t in partners:
                out.append(Pair(rng.choice(partners[t]), swapped, 0, "rule:direction"))
    out += [Pair(a, b, same, "template:direction") for a, b, same in direction_pairs(rng, spec.direction_pairs)]
    surface = 0
    for t in texts:
        if surface >= spec.surface_positives:
            break
        rewritten = surface_rewrite(t, rng)
        if rewritten and rewritten != t:
            out.append(Pair(t, rewritten, 1, "surface"))
            surface += 1
    return out


def training_pairs(spec: VerifierDataSpec, *, sim_spec: D.DataSpec | None = None, embedder=None,
                   progress: bool = True) -> list[Pair]:
    """Every training pair, shuffled, each in a random order (the verifier should be symmetric)."""
    qqp = qqp_split(spec, sim_spec)["train"]
    paws = paws_split(spec)["train"]
    pairs = [Pair(r["q1"], r["q2"], int(r["duplicate"]), "qqp") for r in qqp]
    pairs += [Pair(r["q1"], r["q2"], int(r["duplicate"]), "paws") for r in paws]
    pairs += sts_pairs(spec)
    pairs += mine_negatives(qqp, spec.mined_negatives, pool=spec.mining_pool, embedder=embedder, seed=spec.seed,
                            progress=progress)
    pairs += rule_pairs(qqp, spec)
    rng = random.Random(spec.seed + 14)
    rng.shuffle(pairs)
    keep = [p for p in pairs if p.source.startswith(("rule:direction", "template:"))]
    rest = [p for p in pairs if not p.source.startswith(("rule:direction", "template:"))]
    if spec.max_train_pairs is not None:
        rest = rest[: spec.max_train_pairs]
    pairs = rest + keep
    rng.shuffle(pairs)
    return [Pair(p.b, p.a, p.label, p.source) if rng.random() < 0.5 else p for p in pairs]


def workload_from_rows(name: str, rows: list[dict], seed: int, *, qqp_labels: str = "") -> CalibrationWorkload:
    """The stream of ``benchmarks/quality.py``'s shape from labelled pair rows."""
    cluster_of = _clusters_of(rows)
    texts = sorted(cluster_of)
    random.Random(seed).shuffle(texts)
    cluster = np.array([cluster_of[t] for t in texts], dtype=np.int64)
    neg = set()
    for r in rows:
        if int(r["duplicate"]) == 0:
            a, b = cluster_of[r["q1"]], cluster_of[r["q2"]]
            if a != b:
                neg.add((min(a, b), max(a, b)))
    return CalibrationWorkload(name, texts, cluster, neg, qqp_labels)


def near_miss_rows(rows: list[dict], *, seed: int, limit: int) -> list[dict]:
    """Labelled rows for a near-miss stream: duplicates of ``rows`` and rule-made near misses of their
    texts (each edit its own cluster, labelled "not duplicate")."""
    rng = random.Random(seed)
    dup = [r for r in rows if int(r["duplicate"]) == 1]
    rng.shuffle(dup)
    out = []
    for r in dup[:limit]:
        out.append(r)
        for kind, edited in near_misses(r["q1"], rng)[:2]:
            out.append({"q1": r["q1"], "q2": edited, "duplicate": 0})
    return out


def calibration_workloads(spec: VerifierDataSpec, *, sim_spec: D.DataSpec | None = None) -> list[CalibrationWorkload]:
    """The stream-shaped validation workloads the serving rule is calibrated on."""
    qqp = qqp_split(spec, sim_spec)["calibration"]
    paws = paws_split(spec)["calibration"]
    return [
        workload_from_rows("qqp-calibration", qqp, spec.seed, qqp_labels="all"),
        workload_from_rows("paws-calibration", paws, spec.seed),
        workload_from_rows("near-miss-calibration", near_miss_rows(qqp, seed=spec.seed + 15, limit=1500), spec.seed,
                           qqp_labels="clusters"),
    ]


def verifier_texts(spec: VerifierDataSpec | None = None, sim_spec: D.DataSpec | None = None) -> set[str]:
    """Every text the verifier is trained or calibrated on: benchmarks leave them out."""
    spec = spec or VerifierDataSpec()
    q = qqp_split(spec, sim_spec)
    p = paws_split(spec)
    return {t for part in (q["train"], q["calibration"], p["train"], p["calibration"]) for r in part
            for t in (r["q1"], r["q2"])}
