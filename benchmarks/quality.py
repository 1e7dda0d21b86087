"""Quality benchmark: how often does the cache answer, and how often is it wrong?

    python benchmarks/quality.py                      # full run, rewrites the quality section of docs/benchmarks.md
    python benchmarks/quality.py --tiny --no-doc --json /tmp/q.json   # smoke size
    python benchmarks/quality.py --no-gptcache --no-doc --policy-file DLRS.onnx --json /tmp/dlrs.json
                                                      # another exported actor in the LRS rows (a DLRS export)
    python benchmarks/quality.py --compare-learned /tmp/lrs.json /tmp/dlrs.json
                                                      # their rows side by side: docs/benchmarks.md's learned section

Workloads (from the datasets directory, ``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data``;
subsampled with a fixed seed, see ``--qqp-pairs`` etc.):
QQP dev, PAWS-Wiki dev, PAWS-X dev (7 languages), XQuAD (one question in five languages) and GPTCache's
mock paraphrase set. QQP rows and XQuAD questions that the shipped policy's simulator trains on
(``policy.data.training_texts``: its train split and its training-only labelled pairs) are left out,
so the learned policy is measured on text it has not seen. Every distinct text is one request; texts are grouped into clusters (duplicate
pairs joined transitively, an XQuAD question in its five languages, a mock origin and its paraphrase).
The stream is a random permutation of the texts (seed 0): the first member of a cluster to arrive has
no right answer in the cache (a "negative": any hit on it is wrong), later members have one
("positives"). Near-miss negatives (QQP/PAWS non-duplicates) are interleaved with them at random.

Every system sees the same embeddings (the proxy's ONNX MiniLM, cached on disk by text hash under
``~/.cache/velo-proxy/bench``) and runs the same loop: search the top-P (5) cached entries, decide;
a served request (action A) is a correct hit when the served entry's cluster is the request's, else a
false hit; anything else (B, C) is answered upstream and inserted. Simulated clock: one request per
second. No eviction (every workload fits in the cache).

Systems: static cosine thresholds (GPTCache, LiteLLM, Portkey, APISIX decide this way), the shipped LRS
policy for the embedder (``velo_proxy.policy.SHIPPED_POLICIES``; ``--policy-file``: another export) at its
calibrated operating points (delta = 1/2/5/10 %) and swept over its P(A) threshold, GPTCache 0.1.x itself (sqlite + faiss +
SearchDistanceEvaluation, our embedder plugged in as its embedding function) and the oracle (serves
whenever a top-P hit has the right cluster: the ceiling of any policy over this retrieval).

Two engines run the loop:
* ``store``: the real ``EmbeddedStore`` (SQLite + numpy/usearch HNSW) and the real policy objects:
  the headline operating points;
* ``replay``: the same loop over precomputed exact top-M neighbours with the store's bookkeeping (use
  count, cache value: ``velo_proxy.cache_value``) mirrored in arrays. It is exact (the table reports
  its agreement with the store runs) and ~100x faster, so it draws the curves (hundreds of thresholds).

Metrics: hit rate = correct hits / positives; false-hit rate (FHR) = false hits / hits (the operator's
delta, ``VELO_MAX_FALSE_HIT_RATE``); FPR = hits on negatives / negatives ("hits on non-duplicates");
precision = correct hits / hits; hit rate at FHR <= 1/2/5 % = best hit rate of a system's sweep whose
false-hit rate stays within the bound (chosen in hindsight: flattering to static thresholds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import CACHE_DIR, DOCS, IMG, REPO, md_table  # noqa: E402

from velo_proxy import features as F  # noqa: E402
from velo_proxy.cache_value import INITIAL_VALUE, update_cache_value  # noqa: E402
from velo_proxy.language import language_tag  # noqa: E402

TOP_P = 5
SCOPE = "bench"
DELTAS = (0.01, 0.02, 0.05)
#: The learned actor's calibrated bounds measured here: δ = 10 % too, since the simulator's calibration of
#: the shipped actors finds no threshold for δ ≤ 2 % (docs/policy-results.md) and their rows would be empty.
LEARNED_DELTAS = (0.01, 0.02, 0.05, 0.1)
STORE_THRESHOLDS = (0.95, 0.9, 0.85, 0.8, 0.7)
GPTCACHE_THRESHOLDS = (0.95, 0.9, 0.8)  # GPTCache's own config values (cosine 2t-1 with unit vectors)
PUBLISHED_GPTCACHE = {0.95: (425, 25, 549), 0.9: (804, 77, 118), 0.8: (904, 92, 3)}
SECONDS_PER_REQUEST = 1.0


# ----- workloads --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    description: str
    texts: list[str]  # stream order, distinct
    cluster: np.ndarray  # int64 [N]
    lang: list[str] = field(default_factory=list)
    emb: np.ndarray | None = None
    neg_edges: set[tuple[int, int]] = field(default_factory=set)  # cluster pairs labelled "not duplicate"
    pairs: list[tuple[int, int, int]] = field(default_factory=list)  # (text i, text j, duplicate) as labelled
    # what a false hit counts as in the estimated false-hit rate, on a pair with no label either way and on one
    # labelled "not duplicate": 1 (wrong) unless the labels are known to be noisy (QQP: the hand audit's upper
    # bounds, policy.verifier_calibrate.qqp_label_weights)
    unlabelled_weight: float = 1.0
    labelled_weight: float = 1.0

    def labelled_negative(self, a: int, b: int) -> bool:
        ca, cb = int(self.cluster[a]), int(self.cluster[b])
        return (min(ca, cb), max(ca, cb)) in self.neg_edges

    @property
    def n(self) -> int:
        return len(self.texts)

    def positives_mask(self) -> np.ndarray:
        seen: set[int] = set()
        out = np.zeros(self.n, dtype=bool)
        for i, c in enumerate(self.cluster.tolist()):
            out[i] = c in seen
            seen.add(c)
        return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _from_pairs(name: str, description: str, pairs: list[dict[str, Any]], seed: int) -> Workload:
    uf = _UnionFind()
    langs: dict[str, str] = {}
    for p in pairs:
        a, b = p["q1"].strip(), p["q2"].strip()
        if not a or not b:
            continue
        uf.find(a), uf.find(b)
        langs.setdefault(a, p.get("lang", "en"))
        langs.setdefault(b, p.get("lang", "en"))
        if int(p["duplicate"]) == 1:
            uf.union(a, b)
    texts = sorted(uf.parent)
    random.Random(seed).shuffle(texts)
    roots: dict[str, int] = {}
    cluster = np.array([roots.setdefault(uf.find(t), len(roots)) for t in texts], dtype=np.int64)
    w = Workload(name, description, texts, cluster, [langs[t] for t in texts])
    pos = {t: i for i, t in enumerate(texts)}
    for p in pairs:
        a, b = p["q1"].strip(), p["q2"].strip()
        if a in pos and b in pos:
            w.pairs.append((pos[a], pos[b], int(p["duplicate"])))
            if int(p["duplicate"]) == 0:
                ca, cb = int(cluster[pos[a]]), int(cluster[pos[b]])
                if ca != cb:
                    w.neg_edges.add((min(ca, cb), max(ca, cb)))
    return w


def load_workloads(names: Sequence[str], *, qqp_pairs: int, paws_pairs: int, pawsx_pairs: int,
                   xquad_questions: int, mock_pairs: int, seed: int = 0,
                   exclude: set[str] = frozenset()) -> list[Workload]:
    """``exclude``: texts the shipped policy was trained on (``policy.data.training_texts``); QQP rows
    and XQuAD questions with any of them are left out, so every system is measured on held-out text."""
    data = common.require_data()
    out = []
    for name in names:
        rng = random.Random(seed)
        if name == "qqp":
            rows = _read_jsonl(data / "pairs" / "qqp-dev.jsonl")
            rows = [r for r in rows if r["q1"].strip() not in exclude and r["q2"].strip() not in exclude]
            rows = rng.sample(rows, min(qqp_pairs, len(rows)))
            from policy.verifier_calibrate import qqp_label_weights

            out.append(_from_pairs("qqp", f"QQP dev, {len(rows):,} pairs sampled (seed {seed}) from the rows "
                                   "the policy and the verifier were not trained or calibrated on", rows, seed))
            out[-1].labelled_weight, out[-1].unlabelled_weight = qqp_label_weights()
        elif name == "paws-wiki":
            from policy.verifier_data import VerifierDataSpec, paws_split

            # the held-out part: the pair verifier trains and calibrates on the rest (by component)
            rows = paws_split(VerifierDataSpec(), data)["heldout"]
            rows = rng.sample(rows, min(paws_pairs, len(rows)))
            out.append(_from_pairs("paws-wiki", f"PAWS-Wiki dev, {len(rows):,} held-out pairs (the verifier's "
                                   "training and calibration components left out)", rows, seed))
        elif name == "paws-x":
            rows = []
            for lang in ("de", "en", "es", "fr", "ja", "ko", "zh"):
                part = _read_jsonl(data / "pairs" / f"paws-x-dev-{lang}.jsonl")
                rows += rng.sample(part, min(pawsx_pairs, len(part)))
            out.append(_from_pairs("paws-x", f"PAWS-X dev, {pawsx_pairs:,} pairs x 7 languages", rows, seed))
        elif name == "xquad":
            rows = _read_jsonl(data / "qa" / "xquad-parallel-dev.jsonl")
            rows = [r for r in rows if not any((r.get(f"question_{lang}") or "").strip() in exclude
                                               for lang in ("en", "es", "de", "ru", "zh"))]
            rows = rows[:xquad_questions]
            items: dict[str, tuple[int, str]] = {}
            for ci, r in enumerate(rows):
                for lang in ("en", "es", "de", "ru", "zh"):
                    q = (r.get(f"question_{lang}") or "").strip()
                    if q and q not in items:
                        items[q] = (ci, lang)
            texts = list(items)
            random.Random(seed).shuffle(texts)
            out.append(Workload("xquad", f"XQuAD, {len(rows):,} questions x 5 languages (en es de ru zh), "
                                "those the policy was not trained on", texts,
                                np.array([items[t][0] for t in texts], dtype=np.int64), [items[t][1] for t in texts]))
        elif name == "gptcache-mock":
            pairs = json.loads((data / "pairs" / "gptcache-mock-paraphrases.json").read_text())[:mock_pairs]
            rows = [{"q1": p["origin"], "q2": p["similar"], "duplicate": 1} for p in pairs]
            out.append(_from_pairs("gptcache-mock", f"GPTCache mock paraphrases, {len(rows):,} pairs", rows, seed))
        else:
            raise SystemExit(f"unknown workload {name}")
    return out


def embed_workloads(workloads: list[Workload], cache: common.EmbeddingCache) -> None:
    for w in workloads:
        w.emb = cache.get(w.texts, progress=w.name)


# ----- results ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    served: np.ndarray  # bool [N]
    correct: np.ndarray  # bool [N]
    source: np.ndarray  # int64 [N] stream index of the served entry, -1 if not served
    seconds: float = 0.0
    # the estimated number of false hits when the policy weighs them itself (the verified policy's replay:
    # its own hits' audited score bands, policy.verifier_calibrate.score_bands); None: the workload's weights
    false_estimated: float | None = None

    def metrics(self, positives: np.ndarray, w: "Workload | None" = None) -> dict[str, float]:
        hits = int(self.served.sum())
        labelled = 0
        if w is not None and w.neg_edges:
            for i in np.flatnonzero(self.served & ~self.correct).tolist():
                labelled += w.labelled_negative(i, int(self.source[i]))
        correct = int(self.correct.sum())
        false = hits - correct
        neg = ~positives
        n_pos, n_neg = int(positives.sum()), int(neg.sum())
        return {
            "requests": int(len(self.served)), "positives": n_pos, "negatives": n_neg,
            "hits": hits, "correct": correct, "false": false,
            "hit_rate": correct / n_pos if n_pos else float("nan"),
            "fhr": false / hits if hits else 0.0,
            "fpr": int((self.served & neg).sum()) / n_neg if n_neg else float("nan"),
            "precision": correct / hits if hits else float("nan"),
            "served_share": hits / max(1, len(self.served)),
            "false_labelled": labelled,  # false hits on a pair the dataset labels "not duplicate"
            # labelled wrong + weight x unlabelled (QQP's clusters miss many duplicates: policy/qqp_label_audit.jsonl)
            "fhr_estimated": (self.false_estimated / hits if hits and self.false_estimated is not None else
                              (w.labelled_weight * labelled + w.unlabelled_weight * (false - labelled)) / hits
                              if hits and w is not None else (false / hits if hits else 0.0)),
            "seconds": round(self.seconds, 2),
        }


# ----- replay engine (exact, fast) ----------------------------------------------------------------------


class Replay:
    """The decision loop over precomputed exact neighbours (each request's top-M most similar earlier
    requests). Entries not in the cache (their request was served) are skipped; when fewer than P cached
    candidates remain in the list, the request is searched exactly over the whole cache instead."""

    def __init__(self, emb: np.ndarray, cluster: np.ndarray, *, m: int = 48, block: int = 512) -> None:
        self.emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.cluster = cluster
        n = len(emb)
        m = max(1, min(m, max(n - 1, 1)))
        self.nbr = np.full((n, m), -1, dtype=np.int64)
        self.sim = np.full((n, m), -np.inf, dtype=np.float32)
        for a in range(0, n, block):
            b = min(n, a + block)
            if b <= 1:
                continue
            s = self.emb[a:b] @ self.emb[:b].T  # [b-a, b]
            rows = np.arange(a, b)[:, None]
            s[np.arange(b)[None, :] >= rows] = -np.inf
            k = min(m, b)
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ps = np.take_along_axis(s, part, axis=1)
            order = np.argsort(-ps, axis=1, kind="stable")
            self.nbr[a:b, :k] = np.take_along_axis(part, order, axis=1)
            self.sim[a:b, :k] = np.take_along_axis(ps, order, axis=1)
        self.nbr[~np.isfinite(self.sim)] = -1
        self.nbr_list = self.nbr.tolist()
        self.sim_list = self.sim.tolist()
        self.fallbacks = 0

    def candidates(self, i: int, inserted: np.ndarray, inserted_count: int, limit: int,
                   need: int) -> list[tuple[int, float]]:
        """Top-``limit`` cached entries for request i, exact for at least the first ``need`` of them
        (a threshold policy only looks at the best one)."""
        out = []
        for j, s in zip(self.nbr_list[i], self.sim_list[i]):
            if j < 0:
                break
            if inserted[j]:
                out.append((j, s))
                if len(out) == limit:
                    return out
        if len(out) < min(need, inserted_count) and self.nbr_list[i][-1] >= 0:
            self.fallbacks += 1  # the list ran out: exact search over the whole cache
            idx = np.flatnonzero(inserted[:i])
            sims = self.emb[idx] @ self.emb[i]
            k = min(limit, len(idx))
            part = np.argpartition(-sims, k - 1)[:k] if k < len(idx) else np.arange(len(idx))
            top = part[np.argsort(-sims[part], kind="stable")]
            return [(int(idx[t]), float(sims[t])) for t in top]
        return out

    def run(self, decide: Callable[[int, list[tuple[int, float]], "ReplayState"], int | None], *,
            need: int = TOP_P) -> Outcome:
        """``decide(i, candidates, state)`` returns the index of the entry to serve, or None (upstream).
        ``need``: how many of the top candidates the decision depends on (exactness guaranteed for those)."""
        t0 = time.perf_counter()
        n = len(self.emb)
        st = ReplayState(n)
        served = np.zeros(n, dtype=bool)
        correct = np.zeros(n, dtype=bool)
        source = np.full(n, -1, dtype=np.int64)
        cl = self.cluster
        for i in range(n):
            cands = self.candidates(i, st.inserted, st.count, TOP_P, need) if st.count else []
            j = decide(i, cands, st) if cands else None
            if j is not None:
                served[i], source[i], correct[i] = True, j, cl[j] == cl[i]
                st.values[j], st.uses[j] = update_cache_value(st.values[j], st.uses[j], 1.0)
            else:
                st.inserted[i] = True
                st.count += 1
        return Outcome(served, correct, source, time.perf_counter() - t0)


class ReplayState:
    def __init__(self, n: int) -> None:
        self.inserted = np.zeros(n, dtype=bool)
        self.count = 0
        self.uses = [0] * n
        self.values = [INITIAL_VALUE] * n


def threshold_decider(t: float) -> Callable[..., int | None]:
    def decide(i: int, cands: list[tuple[int, float]], st: ReplayState) -> int | None:
        return cands[0][0] if cands[0][1] >= t else None

    return decide


def oracle_decider(cluster: np.ndarray) -> Callable[..., int | None]:
    def decide(i: int, cands: list[tuple[int, float]], st: ReplayState) -> int | None:
        for j, _ in cands:
            if cluster[j] == cluster[i]:
                return j
        return None

    return decide


class LrsReplay:
    """The LRS actor inside the replay: observations from ``velo_proxy.features`` on thin hit objects
    that carry the mirrored bookkeeping; P(A) memoised per (request, hits, bookkeeping) so a sweep over
    many thresholds runs the actor once per distinct observation."""

    def __init__(self, policy: Any, emb: np.ndarray, pair_score: Callable[[int, int], float] | None = None, *,
                 languages: Sequence[str | None]) -> None:
        self.policy = policy
        self.emb = emb
        # each request's language.language_tag: the cross_language hit feature (feature version 3)
        self.languages = languages
        self.pair_score = pair_score  # the verifier's score of (request, cached), for the hits the rule verifies
        self.memo: dict[tuple, tuple[float, float, float]] = {}
        self.calls = 0

    def probs(self, i: int, cands: list[tuple[int, float]], st: ReplayState) -> tuple[float, float, float]:
        key = (i, tuple((j, st.uses[j]) for j, _ in cands))
        p = self.memo.get(key)
        if p is None:
            hits = [SimpleNamespace(similarity=s, entry=SimpleNamespace(
                vector=self.emb[j], kind=0, cache_value=st.values[j], use_count=st.uses[j],
                created_at=j * SECONDS_PER_REQUEST, language=self.languages[j])) for j, s in cands]
            rule = getattr(self.policy, "verify_rule", None)
            scores = None
            if rule is not None and self.pair_score is not None:
                scores = {k: self.pair_score(i, cands[k][0]) for k in rule.candidates([s for _, s in cands])}
            obs = F.build_observation(self.emb[i], hits, top_p=self.policy.top_p, now=i * SECONDS_PER_REQUEST,
                                      scores=scores, request_language=self.languages[i])
            p = tuple(float(x) for x in self.policy.probs([obs])[0])
            self.memo[key] = p
            self.calls += 1
        return p

    def entry(self, cands: list[tuple[int, float]], st: ReplayState) -> int | None:
        """The cached entry Eq. 4 picks among the candidates (what A serves and C puts into the prompt)."""
        hits = [SimpleNamespace(similarity=s, entry=SimpleNamespace(cache_value=st.values[j])) for j, s in cands]
        k = F.select_entry(hits, top_p=self.policy.top_p)
        return cands[k][0] if k is not None else None

    def decider(self, tau: float) -> Callable[..., int | None]:
        def decide(i: int, cands: list[tuple[int, float]], st: ReplayState) -> int | None:
            p = self.probs(i, cands, st)
            return self.entry(cands, st) if p[F.ACTION_A] >= tau else None

        return decide


# ----- real store engine ---------------------------------------------------------------------------------


def run_store(w: Workload, policy: Any, *, workdir: Path, pair_score: Callable[[int, int], float] | None = None) -> Outcome:
    """The decision loop against a real EmbeddedStore and a real policy object (``decide``); the hits the
    policy wants verified (``to_verify``) get ``pair_score(request, cached)``, as the engine does."""
    from velo_proxy.store.base import CacheEntry
    from velo_proxy.store.embedded import EmbeddedStore

    path = Path(tempfile.mkdtemp(prefix="velo-q-", dir=workdir))
    store = EmbeddedStore(path, dim=w.emb.shape[1])
    n = w.n
    served = np.zeros(n, dtype=bool)
    correct = np.zeros(n, dtype=bool)
    source = np.full(n, -1, dtype=np.int64)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            now = i * SECONDS_PER_REQUEST
            v = w.emb[i]
            hits = store.search(SCOPE, v, limit=TOP_P, now=now)
            scores = None
            if pair_score is not None and hasattr(policy, "to_verify"):
                scores = {k: pair_score(i, int(hits[k].entry.id)) for k in policy.to_verify(hits)}
            decision = policy.decide(v, hits, now=now, scores=scores, request_text=w.texts[i])
            if decision.action == "A" and decision.entry is not None:
                j = int(decision.entry.entry.id)
                served[i], source[i], correct[i] = True, j, w.cluster[j] == w.cluster[i]
                store.record_use(decision.entry.entry.id, outcome=1.0)
            else:
                store.add([CacheEntry(scope=SCOPE, vector=v, question=w.texts[i], answer={"c": int(w.cluster[i])},
                                      model="bench", expires_at=now + 1e9, created_at=now, id=str(i),
                                      cache_value=INITIAL_VALUE)])
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    return Outcome(served, correct, source, time.perf_counter() - t0)


# ----- GPTCache itself -------------------------------------------------------------------------------


def gptcache_available() -> str | None:
    try:
        import gptcache  # noqa: F401
        import faiss  # noqa: F401
        import sqlalchemy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


class _GptCacheEnv:
    """GPTCache's library path: sqlite (its SQLAlchemy scalar store) + faiss (IDMap,Flat, L2) +
    SearchDistanceEvaluation, our MiniLM vectors as its embedding function (looked up by text: the same
    vectors every other system sees)."""

    def __init__(self, dim: int, vectors: dict[str, np.ndarray], threshold: float, workdir: Path) -> None:
        from gptcache import Cache, Config
        from gptcache.manager import manager_factory
        from gptcache.processor.pre import get_prompt
        from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

        import faiss

        faiss.omp_set_num_threads(1)  # OpenMP threads fight over two busy cores (7 ms per search otherwise)
        self.dir = Path(tempfile.mkdtemp(prefix="gptcache-", dir=workdir))
        self.cache = Cache()
        dm = manager_factory("sqlite,faiss", data_dir=str(self.dir), vector_params={"dimension": dim},
                             # GPTCache's LRU keeps 1000 entries by default (eviction_params, not max_size,
                             # sets it for sqlite,faiss): every workload must fit, as it does for the others
                             eviction_params={"max_size": 10_000_000, "clean_size": 1},
                             scalar_params={"sql_url": f"sqlite:///{self.dir}/sqlite.db"})
        self.cache.init(pre_embedding_func=get_prompt, embedding_func=lambda data, **_: vectors[data],
                        data_manager=dm, similarity_evaluation=SearchDistanceEvaluation(),
                        config=Config(similarity_threshold=threshold))

    def get(self, text: str) -> Any:
        from gptcache.adapter.api import get

        return get(text, cache_obj=self.cache)

    def put(self, text: str, answer: str) -> None:
        from gptcache.adapter.api import put

        put(text, answer, cache_obj=self.cache)

    def close(self) -> None:
        try:
            self.cache.data_manager.close()  # flushes faiss.index
        except Exception:  # noqa: BLE001
            pass
        # Cache.init registers an atexit closure that closes ``self.data_manager`` again, after the
        # directory is gone: give it nothing to do.
        self.cache.data_manager = SimpleNamespace(close=lambda: None)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_gptcache(w: Workload, threshold: float, *, workdir: Path) -> Outcome:
    vectors = {t: w.emb[i] for i, t in enumerate(w.texts)}
    env = _GptCacheEnv(w.emb.shape[1], vectors, threshold, workdir)
    n = w.n
    served = np.zeros(n, dtype=bool)
    correct = np.zeros(n, dtype=bool)
    source = np.full(n, -1, dtype=np.int64)
    t0 = time.perf_counter()
    try:
        for i, text in enumerate(w.texts):
            ans = env.get(text)
            if ans is not None:
                j = int(ans)
                served[i], source[i], correct[i] = True, j, w.cluster[j] == w.cluster[i]
            else:
                env.put(text, str(i))
    finally:
        env.close()
    return Outcome(served, correct, source, time.perf_counter() - t0)


# ----- GPTCache's published protocol on its mock set ------------------------------------------------------


def mock_protocol(emb: np.ndarray, mock: list[dict[str, str]], *, workdir: Path, policies: dict[str, Any],
                  gptcache: bool, verifier: Any = None, lrs_verifier: Any = None) -> dict[str, dict[str, int]]:
    """GPTCache's benchmark_sqlite_faiss_onnx.py: cache every ``origin`` first, then ask each ``similar``
    once (nothing new is cached): positive = the pair's own origin answered, negative = another origin
    answered, fail = miss. ``emb`` holds origins then similars."""
    from velo_proxy.store.base import CacheEntry
    from velo_proxy.store.embedded import EmbeddedStore

    n = len(mock)
    origin, similar = emb[:n], emb[n:]
    out: dict[str, dict[str, int]] = {}
    path = Path(tempfile.mkdtemp(prefix="velo-mock-", dir=workdir))
    store = EmbeddedStore(path, dim=emb.shape[1])
    try:
        store.add([CacheEntry(scope=SCOPE, vector=origin[i], question=mock[i]["origin"], answer={"id": i},
                              model="bench", expires_at=1e12, created_at=0.0, id=str(i)) for i in range(n)])
        for name, policy in policies.items():
            pos = neg = fail = 0
            # LRS reads the scores of the verifier it was trained with; the verified policy serves with its own
            scorer = lrs_verifier if "LRS" in name else verifier
            for i in range(n):
                hits = store.search(SCOPE, similar[i], limit=TOP_P, now=1.0)
                scores = None
                if getattr(policy, "verify_rule", None) is not None and scorer is not None:
                    idx = policy.to_verify(hits)
                    vals = scorer.score_sync(mock[i]["similar"], [hits[j].entry.question for j in idx]) if idx else []
                    scores = {j: float(v) for j, v in zip(idx, vals)}
                d = policy.decide(similar[i], hits, now=1.0, scores=scores, request_text=mock[i]["similar"])
                if d.action == "A" and d.entry is not None:
                    if int(d.entry.entry.id) == i:
                        pos += 1
                    else:
                        neg += 1
                else:
                    fail += 1
            out[name] = {"positive": pos, "negative": neg, "fail": fail}
        # oracle over the same retrieval
        pos = fail = 0
        for i in range(n):
            hits = store.search(SCOPE, similar[i], limit=TOP_P, now=1.0)
            if any(int(h.entry.id) == i for h in hits):
                pos += 1
            else:
                fail += 1
        out["oracle (top-5)"] = {"positive": pos, "negative": 0, "fail": fail}
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    if gptcache:
        texts = [m["origin"] for m in mock] + [m["similar"] for m in mock]
        vectors = {t: emb[i] for i, t in enumerate(texts)}  # a text in both roles keeps one vector
        for t in GPTCACHE_THRESHOLDS:
            env = _GptCacheEnv(emb.shape[1], vectors, t, workdir)
            try:
                for i in range(n):
                    env.cache.data_manager.save(mock[i]["origin"], str(i), vectors[mock[i]["origin"]])
                pos = neg = fail = 0
                for i in range(n):
                    ans = env.get(mock[i]["similar"])
                    if ans is None:
                        fail += 1
                    elif int(ans) == i:
                        pos += 1
                    else:
                        neg += 1
                out[f"GPTCache {t:g} (ours: MiniLM)"] = {"positive": pos, "negative": neg, "fail": fail}
            finally:
                env.close()
    return out


def pairwise(w: Workload) -> dict[str, dict[str, float]]:
    """The pair view (no stream, no cache): each labelled pair on its own, as DESIGN.md quotes it."""
    i = np.array([p[0] for p in w.pairs])
    j = np.array([p[1] for p in w.pairs])
    dup = np.array([p[2] for p in w.pairs], dtype=bool)
    sims = np.einsum("ij,ij->i", w.emb[i], w.emb[j])
    out = {}
    for t in (0.95, 0.9, 0.8):
        above = sims >= t
        out[str(t)] = {"duplicates_above": float((above & dup).sum() / max(1, dup.sum())),
                       "wrong_share_above": float((above & ~dup).sum() / max(1, above.sum())),
                       "pairs": int(len(dup)), "duplicates": int(dup.sum())}
    return out


# ----- curves ----------------------------------------------------------------------------------------------


def best_at(points: list[dict[str, float]], delta: float) -> dict[str, float] | None:
    # the label-noise estimate (equal to the plain FHR but on QQP, whose clusters miss many duplicates)
    ok = [p for p in points if p.get("fhr_estimated", p["fhr"]) <= delta + 1e-12 and p["hits"] > 0]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["hit_rate"], -p["fhr"]))


def threshold_grid(fine: bool) -> list[float]:
    step = 0.0025 if fine else 0.01
    return [round(x, 4) for x in np.arange(0.6, 1.0 + 1e-9, step)]


# ----- main ------------------------------------------------------------------------------------------------


def load_lrs(embedder: Any, delta: float, verifier: Any = None, path: Path | None = None) -> Any | None:
    """The shipped LRS actor (or the exported actor at ``path``: a DLRS export, a retrained one) at bound
    ``delta``, its hits verified as in the proxy (the scores are features) but without the verifier's veto:
    these rows measure the actor's own calibrated decision."""
    from velo_proxy.policy import LearnedPolicy, PolicyMismatch, default_policy_path

    if path is None:
        try:
            path = default_policy_path(embedder.id)  # the one shipped for this embedder
        except PolicyMismatch:
            return None  # none shipped for it: its rows are left out
        if not path.exists():
            return None
    rule = verifier.rule(delta) if verifier is not None else None
    return LearnedPolicy(path, embedder_id=embedder.id, dim=embedder.dim, max_false_hit_rate=delta,
                         verify_rule=rule, veto=False)


#: Earlier neighbours per request whose pairs are scored up front, in batches (the LRS rows' candidates
#: are the top few *inserted* earlier requests above the verifier's cosine floor, almost always among these).
PREFETCH_NEIGHBOURS = 8


def pair_scorer(w: Workload, verifier: Any, *, prefetch: int = PREFETCH_NEIGHBOURS) -> Callable[[int, int], float] | None:
    """The verifier's score of (request i, cached j) on ``w``, disk-cached (``ScoreCache``), memoised. The
    pairs the LRS rows will almost surely ask for (each request with its ``prefetch`` nearest earlier
    requests above the cosine floor) are scored first in batched calls; any other pair is scored when
    asked, one call per pair."""
    if verifier is None:
        return None
    from policy.verifier_calibrate import ScoreCache, neighbours

    cache, memo = ScoreCache(), {}
    pairs: list[tuple[int, int]] = []
    if prefetch > 0 and w.n:
        floor = float(verifier.calibration.get("cosine_floor") or 0.0)
        nbr, _ = neighbours(np.ascontiguousarray(w.emb, dtype=np.float32), m=prefetch, floor=floor)
        pairs = [(i, j) for i, js in enumerate(nbr) for j in js]
        if pairs:
            vals = cache.score(verifier, [w.texts[i] for i, _ in pairs], [w.texts[j] for _, j in pairs], progress=True)
            memo.update({p: float(v) for p, v in zip(pairs, vals)})

    def score(i: int, j: int) -> float:
        if (i, j) not in memo:
            memo[(i, j)] = float(cache.score(verifier, [w.texts[i]], [w.texts[j]])[0])
        return memo[(i, j)]

    score.prefetched = len(pairs)  # type: ignore[attr-defined]
    score.pairs = pairs  # type: ignore[attr-defined]
    return score


def held_back(args: argparse.Namespace) -> set[str]:
    """Texts the pair verifier trains or is calibrated on (left out of every workload)."""
    if args.tiny or not args.verifier:
        return set()
    from policy.verifier_data import verifier_texts

    return verifier_texts()


def load_verifier(args: argparse.Namespace, *, embedder_id: str, learned: bool = False) -> Any | None:
    """The exported pair verifier the proxy serves with (``velo-proxy models export``), with its calibration
    block for ``embedder_id``'s vectors, or None (its rows are left out: ``--no-verifier``). ``learned``: the
    one ``VELO_POLICY=learned`` loads, whose scores are the LRS actor's hit features: loaded whatever
    ``--no-verifier`` says, since without them the actor sees no verified hit and serves nothing."""
    if not (args.verifier or learned):
        return None
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier, VerifierUnavailable

    settings = Settings(policy="learned") if learned else Settings()
    try:
        return PairVerifier(settings.verifier_dir, threads=args.threads, embedder_id=embedder_id)
    except VerifierUnavailable as exc:
        print(f"pair verifier not measured: {exc}", file=sys.stderr)
        return None


def verified_rows(w: Workload, verifier: Any, pos: np.ndarray, wr: dict[str, Any]) -> None:
    """The verified policy on ``w``: its curve over score thresholds and its calibrated operating points,
    from the replay of ``policy.verifier_calibrate`` (the proxy's loop and serving rule)."""
    from policy import verifier_calibrate as VC
    from velo_proxy.verifier import VerifyRule

    cal = verifier.calibration
    floor, top_k = float(cal["cosine_floor"]), int(cal["top_k"])
    t0 = time.perf_counter()
    # QQP's noisy labels: the verifier's hits are weighed by the audit of its own served hits where it has one
    bands = VC.score_bands(verifier.id)
    prep = VC.prepare(w.name, w.texts, w.cluster, w.emb, verifier, floor=floor, m=TOP_P, progress=True,
                      neg_edges=w.neg_edges, unlabelled_weight=w.unlabelled_weight, labelled_weight=w.labelled_weight,
                      unlabelled_bands=bands["unlabelled"] if w.unlabelled_weight != 1.0 else (),
                      labelled_bands=bands["labelled_negative"] if w.labelled_weight != 1.0 else ())
    wr["verifier_pairs"] = sum(len(x) for x in prep.nbr)
    wr["verifier_scoring_s"] = round(time.perf_counter() - t0, 1)

    def outcome(threshold: float) -> Outcome:
        r = VC.replay(prep, VerifyRule(cosine_floor=floor, top_k=top_k, threshold=threshold))
        served = r["served"] >= 0
        correct = served & (w.cluster[np.maximum(r["served"], 0)] == w.cluster)
        return Outcome(served, correct, r["served"], false_estimated=r["false_estimated"])

    curve = []
    for t in VC.threshold_grid([prep], steps=60):
        m = outcome(t).metrics(pos, w)
        m["threshold"] = t
        curve.append(m)
    wr["curves"]["verified"] = curve
    for key, t in sorted(cal["thresholds"].items(), key=lambda kv: float(kv[0])):  # every calibrated bound
        d = float(key)
        t1 = time.perf_counter()
        o = outcome(float(t))
        o.seconds = time.perf_counter() - t1
        wr["points"][f"verified δ={d:g}"] = {"engine": "replay", "threshold": float(t), **o.metrics(pos, w)}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from policy.data import DataSpec, training_texts  # what the shipped policy was trained on: left out
    from velo_proxy.policy import ThresholdPolicy

    common.require_data()  # before anything reads the datasets: a missing directory is a message, not a traceback
    t_start = time.time()
    embedder = common.load_embedder(threads=args.threads)
    cache = common.EmbeddingCache(embedder)
    workloads = load_workloads(args.workloads, qqp_pairs=args.qqp_pairs, paws_pairs=args.paws_pairs,
                               pawsx_pairs=args.pawsx_pairs, xquad_questions=args.xquad_questions,
                               mock_pairs=args.mock_pairs,
                               # --tiny runs on small slices (tests/data): the full spec would take every
                               # row of them, so the smoke run leaves out the tiny spec's training texts
                               exclude=training_texts(DataSpec.tiny() if args.tiny else None) | held_back(args))
    embed_workloads(workloads, cache)
    verifier = load_verifier(args, embedder_id=embedder.id)
    # LRS reads the scores of the verifier it was trained with (VELO_POLICY=learned's default, today the default one)
    lrs_verifier = load_verifier(args, embedder_id=embedder.id, learned=True) if args.lrs else None
    lrs = {d: load_lrs(embedder, d, lrs_verifier, args.policy_file) if args.lrs else None for d in LEARNED_DELTAS}
    lrs_ok = lrs[DELTAS[0]] is not None
    gpt_err = None if args.gptcache else "disabled (--no-gptcache)"
    if args.gptcache:
        gpt_err = gptcache_available()
    # tmpfs when there is one: GPTCache commits (and fsyncs) SQLite on every get and put, ~20 ms each on
    # this disk, which would measure the disk, not the decisions.
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="velo-quality-", dir=shm if shm.is_dir() else None))
    result: dict[str, Any] = {
        "machine": common.machine_info(), "embedder": embedder.id, "top_p": TOP_P,
        "lrs": {"present": lrs_ok, "version": lrs[DELTAS[0]].version if lrs_ok else None,
                "file": str(getattr(lrs[DELTAS[0]], "path", "")) if lrs_ok else None,
                "thresholds": {str(d): lrs[d].threshold for d in LEARNED_DELTAS} if lrs_ok else None},
        "gptcache": {"error": gpt_err}, "args": {k: v for k, v in vars(args).items() if k != "func"},
        "verifier": None if verifier is None else {"id": verifier.id, "precision": verifier.metadata.get("precision"),
                                                   "cosine_floor": verifier.calibration.get("cosine_floor"),
                                                   "top_k": verifier.calibration.get("top_k"),
                                                   "thresholds": verifier.calibration.get("thresholds")},
        "workloads": {},
    }
    try:
        for w in workloads:
            print(f"[{w.name}] {w.n} requests, {int(w.positives_mask().sum())} positives", file=sys.stderr, flush=True)
            pos = w.positives_mask()
            wr: dict[str, Any] = {"description": w.description, "requests": w.n, "positives": int(pos.sum()),
                                  "negatives": int((~pos).sum()), "curves": {}, "points": {}, "check": {}}
            t0 = time.perf_counter()
            rp = Replay(w.emb, w.cluster, m=args.neighbours)
            score_pair = pair_scorer(w, lrs_verifier)  # one memo per workload, shared by every LRS run on it
            wr["neighbours_s"] = round(time.perf_counter() - t0, 2)
            # static thresholds: the curve from the replay
            curve = []
            for t in threshold_grid(args.fine):
                m = rp.run(threshold_decider(t), need=1).metrics(pos, w)
                m["threshold"] = t
                curve.append(m)
            wr["curves"]["threshold"] = curve
            m = rp.run(oracle_decider(w.cluster)).metrics(pos, w)
            wr["points"]["oracle (top-5)"] = {"engine": "replay", **m}
            # LRS: curve over P(A) thresholds, calibrated points
            if lrs_ok:
                languages = [language_tag(t) for t in w.texts]  # once per workload, for every LRS replay
                lr = LrsReplay(lrs[DELTAS[0]], w.emb, score_pair, languages=languages)
                # P(A) spans orders of magnitude (calibrated thresholds sit near 0.4, high-hit-rate points
                # near 0.001): log-spaced below 0.05, linear above
                k = max(2, args.lrs_steps // 3)
                taus = sorted(set([round(float(x), 5) for x in np.geomspace(1e-4, 0.05, k)]
                                  + [round(float(x), 4) for x in np.linspace(0.05, 0.99, args.lrs_steps - k)]
                                  + [lrs[d].threshold for d in LEARNED_DELTAS if lrs[d].threshold <= 1.0]))
                lcurve = []
                t_lrs = time.perf_counter()
                for tau in taus:
                    m = rp.run(lr.decider(tau)).metrics(pos, w)
                    m["threshold"] = tau
                    lcurve.append(m)
                print(f"  LRS sweep: {len(taus)} thresholds, {lr.calls} actor calls, "
                      f"{time.perf_counter() - t_lrs:.0f} s", file=sys.stderr, flush=True)
                wr["curves"]["lrs"] = lcurve
                wr["lrs_actor_calls"] = lr.calls
            if verifier is not None and w.name != "paws-x":  # English-only verifier: PAWS-X is #16's
                verified_rows(w, verifier, pos, wr)
                for name, pt in wr["points"].items():
                    if name.startswith("verified"):
                        print(f"  {name}: {pt['hit_rate']:.3f} hit, {pt['fhr']:.3f} FHR, estimate "
                              f"{pt['fhr_estimated']:.3f}", file=sys.stderr, flush=True)
            # headline operating points on the real store
            systems: list[tuple[str, Any, Callable[..., Any] | None]] = []
            for t in STORE_THRESHOLDS:
                systems.append((f"threshold {t:g}", ThresholdPolicy(threshold=t, top_p=TOP_P), threshold_decider(t)))
            if lrs_ok:
                for d in LEARNED_DELTAS:
                    systems.append((f"LRS δ={d:g}", lrs[d], LrsReplay(lrs[d], w.emb, score_pair, languages=languages).decider(lrs[d].threshold)))
            for name, policy, rdecide in systems:
                if args.store:
                    o = run_store(w, policy, workdir=workdir, pair_score=score_pair)
                    m = o.metrics(pos, w)
                    wr["points"][name] = {"engine": "store", **m}
                    if rdecide is not None:
                        ro = rp.run(rdecide, need=1 if name.startswith("threshold") else TOP_P)
                        wr["check"][name] = {"replay_hits": int(ro.served.sum()), "store_hits": int(o.served.sum()),
                                             "same_decisions": float((ro.served == o.served).mean())}
                else:
                    wr["points"][name] = {"engine": "replay", **rp.run(
                        rdecide, need=1 if name.startswith("threshold") else TOP_P).metrics(pos, w)}
                print(f"  {name}: {wr['points'][name]['hit_rate']:.3f} hit, {wr['points'][name]['fhr']:.3f} FHR "
                      f"({wr['points'][name]['seconds']} s)", file=sys.stderr, flush=True)
            if gpt_err is None:
                for t in GPTCACHE_THRESHOLDS:
                    o = run_gptcache(w, t, workdir=workdir)
                    name = f"GPTCache {t:g}"
                    wr["points"][name] = {"engine": "gptcache", "cosine_equiv": round(2 * t - 1, 4), **o.metrics(pos, w)}
                    ro = rp.run(threshold_decider(2 * t - 1 - 1e-6), need=1)
                    wr["check"][name] = {"replay_cos_hits": int(ro.served.sum()), "gptcache_hits": int(o.served.sum()),
                                         "same_decisions": float((ro.served == o.served).mean())}
                    print(f"  {name}: {wr['points'][name]['hit_rate']:.3f} hit, {wr['points'][name]['fhr']:.3f} FHR "
                          f"({o.seconds:.1f} s)", file=sys.stderr, flush=True)
            wr["replay_fallbacks"] = rp.fallbacks
            if w.pairs:
                wr["pairwise"] = pairwise(w)
            # hit rate at fixed false-hit rate
            at: dict[str, dict[str, Any]] = {}
            for sysname, pts in wr["curves"].items():
                at[sysname] = {}
                for d in DELTAS:
                    b = best_at(pts, d)
                    at[sysname][str(d)] = None if b is None else {"hit_rate": b["hit_rate"], "threshold": b["threshold"],
                                                                  "fhr": b["fhr"]}
            wr["at_fhr"] = at
            result["workloads"][w.name] = wr
        # GPTCache's published protocol
        if "gptcache-mock" in args.workloads or args.mock_protocol:
            mock = json.loads((common.require_data() / "pairs" / "gptcache-mock-paraphrases.json").read_text())[:args.mock_pairs]
            emb = cache.get([m["origin"] for m in mock] + [m["similar"] for m in mock], progress="mock")
            pols: dict[str, Any] = {f"VELO threshold {t:g}": ThresholdPolicy(threshold=t, top_p=TOP_P)
                                    for t in (0.95, 0.9, 0.8, 0.7, 0.6)}
            if lrs_ok:
                for d in LEARNED_DELTAS:
                    pols[f"VELO LRS δ={d:g}"] = lrs[d]
            if verifier is not None:
                from velo_proxy.policy import VerifiedPolicy

                for key in verifier.calibration["thresholds"]:
                    pols[f"VELO verified δ={float(key):g}"] = VerifiedPolicy(rule=verifier.rule(float(key)), version="bench",
                                                                            top_p=TOP_P)
            result["mock_protocol"] = mock_protocol(emb, mock, workdir=workdir, policies=pols,
                                                    gptcache=gpt_err is None, verifier=verifier,
                                                    lrs_verifier=lrs_verifier)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.time() - t_start, 1)
    result["embedded_now"] = cache.embedded_now
    return result


# ----- report -------------------------------------------------------------------------------------------------


SYSTEM_ORDER = ["verified δ=0.01", "verified δ=0.02", "verified δ=0.05", "verified δ=0.1",
                "threshold 0.95", "threshold 0.9", "threshold 0.85", "threshold 0.8", "threshold 0.7",
                "GPTCache 0.95", "GPTCache 0.9", "GPTCache 0.8", "LRS δ=0.01", "LRS δ=0.02", "LRS δ=0.05", "LRS δ=0.1",
                "oracle (top-5)"]


def plot(result: dict[str, Any], img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    names = list(result["workloads"])
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        wr = result["workloads"][name]
        for sysname, style in (("threshold", "-"), ("lrs", "-"), ("verified", "-")):
            pts = wr["curves"].get(sysname)
            if not pts:
                continue
            # a parametric curve in the threshold; points that serve nothing have no false-hit rate
            pts = sorted((p for p in pts if p["hits"] > 0), key=lambda p: -p["threshold"])
            label = {"threshold": "static cosine threshold (sweep)", "lrs": "LRS (P(A) sweep)",
                     "verified": "pair verifier (score sweep)"}[sysname]
            ax.plot([100 * p["fhr"] for p in pts], [100 * p["hit_rate"] for p in pts], style, marker=".", ms=3,
                    label=label, lw=1.0)
        for pname, p in wr["points"].items():
            if pname.startswith("threshold"):
                ax.plot(100 * p["fhr"], 100 * p["hit_rate"], "o", color="C0", ms=4)
                ax.annotate(pname.split()[-1], (100 * p["fhr"], 100 * p["hit_rate"]), fontsize=7,
                            xytext=(3, -8), textcoords="offset points")
            elif pname.startswith("GPTCache"):
                ax.plot(100 * p["fhr"], 100 * p["hit_rate"], "s", color="C2", ms=5,
                        label="GPTCache (0.95/0.9/0.8)" if pname.endswith("0.95") else None)
            elif pname.startswith("LRS"):
                ax.plot(100 * p["fhr"], 100 * p["hit_rate"], "D", color="C1", ms=5,
                        label="LRS calibrated δ=1/2/5/10 %" if pname.endswith("0.01") else None)
            elif pname.startswith("verified"):
                ax.plot(100 * p.get("fhr_estimated", p["fhr"]), 100 * p["hit_rate"], "*", color="C3", ms=9,
                        label=f"verified, calibrated ({pname.split()[-1]})")
            elif pname.startswith("oracle"):
                ax.axhline(100 * p["hit_rate"], color="k", ls=":", lw=1, label="oracle (top-5 retrieval)")
        for d in DELTAS:
            ax.axvline(100 * d, color="grey", lw=0.5, ls="--")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 101)
        ax.set_title(f"{name} ({wr['requests']:,} requests)", fontsize=10)
        ax.set_xlabel("false-hit rate: wrong hits / hits (%)")
        ax.set_ylabel("hit rate: correct hits / positives (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path = img_dir / "bench-quality-curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def markdown(result: dict[str, Any], command: str) -> str:
    lines: list[str] = []
    m = result["machine"]
    lines.append(f"Measured {m['utc']} UTC on {m['cpu']}, {m['cores']} cores, {m['mem_mb']:,} MB RAM, load average "
                 f"{m['load_avg']} at the start (git {m['git'] or '?'}); embedder `{result['embedder']}`, top-P {result['top_p']}. "
                 f"Run time {result['seconds']:.0f} s. Command:\n\n```bash\n{command}\n```\n")
    lrs = result["lrs"]
    if lrs["present"]:
        lines.append(f"LRS policy: `{lrs['version']}`, calibrated P(A) thresholds {lrs['thresholds']}.\n")
    else:
        lines.append("LRS policy: **not present** (the package shipped none for this embedder when this ran); "
                     "rerun the command once it ships to add its rows and curve.\n")
    ver = result.get("verifier")
    if ver:
        lines.append(f"Pair verifier: `{ver['id']}` ({ver['precision']}), cosine floor {ver['cosine_floor']}, "
                     f"top-{ver['top_k']} verified, score thresholds calibrated on training-only streams "
                     f"{ver['thresholds']} (δ → threshold).\n")
        rows = []
        from policy.verifier_calibrate import upper_bound

        for name, wr in result["workloads"].items():
            for pname, pt in wr["points"].items():
                if not pname.startswith("verified"):
                    continue
                d = float(pname.split("=")[1])
                est = pt.get("fhr_estimated", pt["fhr"])
                ucb = upper_bound(math.ceil(est * pt["hits"] - 1e-9), pt["hits"])
                rows.append([name, f"{100 * d:g} %", f"{100 * pt['hit_rate']:.1f} %", f"{pt['correct']:,} / {pt['false']:,}",
                             f"{100 * pt['fhr']:.2f} %", f"{100 * est:.2f} %", f"{100 * ucb:.2f} %",
                             "yes" if est <= d else "**no**"])
        if rows:
            lines.append("**Does the calibrated bound hold on held-out workloads?** (the verified policy at the "
                         "thresholds calibrated for δ; FHR measured; 95 % upper bound = one-sided Clopper-Pearson)\n")
            lines.append(md_table(["workload", "δ", "hit rate", "correct / false hits", "FHR (every other-cluster hit)",
                                   "FHR, label-noise estimate", "its 95 % upper bound", "estimate ≤ δ"], rows))
            lines.append("")
    if result["gptcache"]["error"]:
        lines.append(f"GPTCache: not run ({result['gptcache']['error']}).\n")
    lines.append("**Workloads**\n")
    lines.append(md_table(["workload", "what", "requests", "positives", "negatives"],
                          [[k, v["description"], f"{v['requests']:,}", f"{v['positives']:,}", f"{v['negatives']:,}"]
                           for k, v in result["workloads"].items()]))
    lines.append("\n**Hit rate at a fixed false-hit rate** (best point of each system's sweep with FHR ≤ bound, on QQP its "
                 "label-noise estimate; "
                 "the threshold that achieves it in brackets; – = no operating point that strict serves anything)\n")
    rows = []
    for name, wr in result["workloads"].items():
        for sysname, label in (("verified", "pair verifier"), ("threshold", "static threshold"), ("lrs", "LRS")):
            if sysname not in wr["at_fhr"]:
                continue
            cells = [name, label]
            for d in DELTAS:
                b = wr["at_fhr"][sysname][str(d)]
                cells.append("–" if b is None else f"{100 * b['hit_rate']:.1f} % ({b['threshold']:g})")
            rows.append(cells)
        o = wr["points"].get("oracle (top-5)")
        if o:
            rows.append([name, "oracle (top-5)", *[f"{100 * o['hit_rate']:.1f} %"] * len(DELTAS)])
    lines.append(md_table(["workload", "system", *[f"hit rate @ FHR ≤ {100 * d:g} %" for d in DELTAS]], rows))
    lines.append("\n**Operating points** (hit rate = correct hits / positives; FHR = wrong hits / hits; "
                 "FPR = hits on negatives / negatives; engine: `store` = real EmbeddedStore + policy object, "
                 "`gptcache` = GPTCache itself, `replay` = exact replay)\n")
    for name, wr in result["workloads"].items():
        rows = []
        for sysname in SYSTEM_ORDER + [k for k in wr["points"] if k not in SYSTEM_ORDER]:
            p = wr["points"].get(sysname)
            if p is None:
                continue
            label = sysname + (f" (cos ≥ {p['cosine_equiv']:g})" if "cosine_equiv" in p else "")
            rows.append([label, f"{100 * p['hit_rate']:.1f} %", f"{100 * p['fhr']:.1f} %",
                         f"{100 * p.get('fhr_estimated', p['fhr']):.1f} %", f"{100 * p['fpr']:.2f} %",
                         f"{100 * p['precision']:.1f} %" if p["precision"] == p["precision"] else "–",
                         f"{p['correct']:,} / {p['false']:,}" + (f" ({p['false_labelled']:,})" if wr.get("pairwise") else ""),
                         p["engine"]])
        lines.append(f"*{name}* — {wr['description']}\n")
        lines.append(md_table(["system", "hit rate", "FHR", "FHR, label-noise estimate", "FPR", "precision",
                               "correct / false hits" + (" (of which on pairs labelled not duplicate)" if wr.get("pairwise") else ""),
                               "engine"], rows))
        lines.append("")
    prow = []
    for name, wr in result["workloads"].items():
        for t, v in (wr.get("pairwise") or {}).items():
            if name != "gptcache-mock":
                prow.append([name, t, f"{100 * v['duplicates_above']:.1f} %", f"{100 * v['wrong_share_above']:.1f} %",
                             f"{v['pairs']:,} ({v['duplicates']:,} duplicates)"])
    if prow:
        lines.append("**Pair view** (each labelled pair alone, no stream: the figure DESIGN.md quotes; a pair is "
                     "above t when cos(q1, q2) ≥ t)\n")
        lines.append(md_table(["workload", "t", "duplicates above t", "non-duplicates among pairs above t", "pairs"], prow))
        lines.append("")
    if "mock_protocol" in result:
        lines.append("**GPTCache's published benchmark, reproduced** (its protocol: cache all 999 `origin`s, ask each "
                     "`similar` once; positive = own origin served, negative = another origin served, fail = miss)\n")
        rows = [[f"GPTCache published {t:g} (its ALBERT ONNX model, raw L2)", *PUBLISHED_GPTCACHE[t]]
                for t in GPTCACHE_THRESHOLDS]
        rows += [[k, v["positive"], v["negative"], v["fail"]] for k, v in result["mock_protocol"].items()]
        lines.append(md_table(["system", "positive", "negative", "fail (miss)"], rows))
        lines.append("")
    checks = []
    for name, wr in result["workloads"].items():
        for sysname, c in wr["check"].items():
            checks.append([name, sysname, *[f"{v:.4f}" if isinstance(v, float) else v for v in c.values()]])
    if checks:
        lines.append("**Replay vs real engines** (share of requests where the exact replay took the same serve/forward "
                     "decision as the real store or GPTCache; the curves come from the replay)\n")
        lines.append(md_table(["workload", "system", "replay hits", "real hits", "same decisions"], checks))
    lines.append("\n![quality curves](img/bench-quality-curves.png)\n")
    return "\n".join(lines)


def merge_results(paths: Sequence[Path]) -> dict[str, Any]:
    """One result from runs over disjoint workloads (same embedder and code)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(parts[0])
    out["workloads"], out["commands"] = {}, []
    for r in parts:
        out["workloads"].update(r["workloads"])
        out["commands"].append(r.get("command", "?"))
        if "mock_protocol" in r:
            out["mock_protocol"] = r["mock_protocol"]
        if not r["gptcache"].get("error"):
            out["gptcache"] = r["gptcache"]
    out["seconds"] = max(r["seconds"] for r in parts)  # they ran side by side
    out["machine"]["load_avg"] = max((r["machine"]["load_avg"] for r in parts), key=lambda x: x[0])
    return out


def learned_comparison(paths: Sequence[Path]) -> str:
    """Markdown: the learned actors of several runs (``--policy-file``: the shipped LRS, a DLRS export, ...)
    side by side at each calibrated bound, on every workload they share: does the bound hold, at what hit rate."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    parts = [r for r in parts if r["lrs"]["present"]]
    if not parts:
        return "No run in these results measured a learned actor."
    lines = ["Commands:\n", "```bash", *[r.get("command", "?") for r in parts], "```\n"]
    lines.append("Calibrated P(A) thresholds (simulator validation streams; 1.01 = never serve): " + "; ".join(
        f"`{r['lrs']['version']}` {r['lrs']['thresholds']}" for r in parts) + ".\n")
    names = [w for w in parts[0]["workloads"] if all(w in r["workloads"] for r in parts)]
    rows = []
    for w in names:
        for d in LEARNED_DELTAS:
            cells = [w, f"{100 * d:g} %"]
            for r in parts:
                p = r["workloads"][w]["points"].get(f"LRS δ={d:g}")
                if p is None:
                    cells.append("–")
                    continue
                est = p.get("fhr_estimated", p["fhr"])
                cells.append("serves nothing" if not p["hits"] else
                             f"{100 * p['hit_rate']:.1f} % at {100 * p['fhr']:.1f} % (est. {100 * est:.1f} %)"
                             f"{'' if est <= d else ' **no**'}")
            rows.append(cells)
    lines.append("Hit rate (correct hits / positives) at FHR (wrong hits / hits; est. = the workload's label-noise "
                 "estimate, the number held to δ; **no** = above δ), real store:\n")
    lines.append(md_table(["workload", "δ", *[f"`{r['lrs']['version']}`" for r in parts]], rows))
    return "\n".join(lines)


def write_section(doc: Path, section: str, body: str) -> None:
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["qqp", "paws-wiki", "paws-x", "xquad", "gptcache-mock"])
    ap.add_argument("--qqp-pairs", type=int, default=20000)
    ap.add_argument("--paws-pairs", type=int, default=8000)
    ap.add_argument("--pawsx-pairs", type=int, default=1000, help="pairs per language")
    ap.add_argument("--xquad-questions", type=int, default=2000)
    ap.add_argument("--mock-pairs", type=int, default=999)
    ap.add_argument("--neighbours", type=int, default=48, help="exact neighbours precomputed per request (replay)")
    ap.add_argument("--lrs-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the embedder")
    ap.add_argument("--fine", action="store_true", default=True)
    ap.add_argument("--no-store", dest="store", action="store_false", help="operating points from the replay only")
    ap.add_argument("--no-gptcache", dest="gptcache", action="store_false")
    ap.add_argument("--no-verifier", dest="verifier", action="store_false", help="leave out the pair verifier's rows")
    ap.add_argument("--no-lrs", dest="lrs", action="store_false", help="leave out the shipped LRS policy's rows")
    ap.add_argument("--policy-file", type=Path, default=None,
                    help="the exported actor measured in the LRS rows (default: the one shipped for the embedder); e.g. "
                         "a DLRS export from python -m policy.reproduce --dlrs, with --no-doc")
    ap.add_argument("--compare-learned", type=Path, nargs="+",
                    help="write the learned-actors section of --doc from these results (runs with --policy-file)")
    ap.add_argument("--mock-protocol", action="store_true", help="run GPTCache's protocol even without the mock workload")
    ap.add_argument("--tiny", action="store_true", help="smoke size: a few hundred pairs per workload")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="datasets directory (default: env VELO_DATASETS_DIR, else ../shared/data)")
    ap.add_argument("--merge", type=Path, nargs="+", help="write the doc from the JSON results of runs over "
                    "disjoint workloads (run them in parallel processes), instead of running")
    ap.add_argument("--json", type=Path, default=CACHE_DIR / "quality.json")
    ap.add_argument("--doc", type=Path, default=DOCS / "benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=IMG)
    ap.add_argument("--no-doc", dest="write_doc", action="store_false")
    args = ap.parse_args(argv)
    if args.policy_file is not None and not args.policy_file.is_file():
        ap.error(f"--policy-file {args.policy_file}: no such file")  # before minutes of embedding, not after
    common.set_data_dir(args.data_dir)
    if args.tiny:
        args.qqp_pairs, args.paws_pairs, args.pawsx_pairs = 150, 100, 20
        args.xquad_questions, args.mock_pairs, args.lrs_steps, args.fine = 40, 60, 5, False
    command = ("python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.compare_learned:
        body = learned_comparison(args.compare_learned)
        if args.write_doc:
            write_section(args.doc, "learned", body)
            print(f"doc: {args.doc}", file=sys.stderr)
        else:
            print(body)
        return 0
    if args.merge:
        result = merge_results(args.merge)
        command = "\n".join(result.pop("commands")) + "\n" + command
    else:
        result = evaluate(args)
        result["command"] = command
    common.write_json(args.json, result)
    print(f"results: {args.json}", file=sys.stderr)
    if args.write_doc:
        plot(result, args.img_dir)
        write_section(args.doc, "quality", markdown(result, command))
        print(f"doc: {args.doc}", file=sys.stderr)
    else:
        print(markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
