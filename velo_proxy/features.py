"""Observations of the edge policy (LRS): the one place where features are computed, for training
(``policy/`` simulator) and for serving (the proxy) alike. numpy only, never torch.

For one request an observation holds:

- ``request_embedding`` float32 ``[D]``: the request's (L2-normalised) embedding u;
- ``hit_embeddings`` float32 ``[P, D]``: the stored vectors v_i of the top-P hits, best first;
- ``hit_features`` float32 ``[P, K]``: per-hit scalars named by ``HIT_FEATURE_NAMES``;
- ``hit_mask`` float32 ``[P]``: 1 for a real hit, 0 for padding (padding rows are all zeros).

Since version 2 a hit row carries the pair verifier's score (``velo_proxy.verifier``) of (request,
cached question) when the serving rule verified that hit (``VerifyRule.candidates``: the best
``top_k`` hits above the cosine floor), and a flag saying so. Since version 3 it also says whether the
cached question is in another language than the request (``velo_proxy.language``: a cached answer in
Spanish does not answer a question asked in German, however close the two vectors are; action C does:
docs/policy.md, QoS model, "Across languages"). Training and serving verify the same
hits: the simulator looks the scores up in a table made by the same verifier (``policy/pair_scores.py``),
the proxy scores them in one batched call before the policy decides.

The exported actor takes these four arrays, batched, under the same names (``stack_observations``),
and returns action probabilities in the order A (serve from cache), B (forward), C (augment).

``select_entry`` is Eq. 4 of the paper as we read it: which cached entry action A serves and
action C puts into the prompt. See docs/policy.md for the reading and its reasons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from velo_proxy.language import language_tag, tags_differ

FEATURE_VERSION: int = 3

#: Per-hit scalar features, in column order of ``hit_features``.
HIT_FEATURE_NAMES: tuple[str, ...] = (
    "similarity",  # cosine similarity u.v_i in [-1, 1]
    "log_distance",  # log10(max(1 - similarity, 1e-4)) / 4: resolution near 1, in [-1, ~0.08]
    "kind",  # c^k: 0 question vector, 1 answer vector
    "cache_value",  # c^r (Eq. 5), in [0, 1]
    "log_use_count",  # log1p(c^f) / 5
    "log_age",  # log1p(age in seconds) / 15
    "rank",  # i / P (0 for the best hit)
    "gap_to_top",  # similarity of the best hit minus this one's (>= 0)
    "verifier_score",  # the pair verifier's P(same request) of (request, this hit's question); 0 if not verified
    "verified",  # 1 when the verifier scored this hit, 0 when it did not (below the floor, beyond top_k, failed)
    "cross_language",  # 1 when the cached question is in another language than the request (language.tags_differ)
)
K: int = len(HIT_FEATURE_NAMES)

#: ONNX input names, in the order ``stack_observations`` returns them.
INPUT_NAMES: tuple[str, ...] = ("request_embedding", "hit_embeddings", "hit_features", "hit_mask")
#: Action order of the actor's output.
ACTIONS: tuple[str, ...] = ("A", "B", "C")
ACTION_A, ACTION_B, ACTION_C = 0, 1, 2

#: Eq. 4 (our reading): weight of the cache value next to the similarity when picking an entry.
SELECT_VALUE_WEIGHT: float = 0.01


@dataclass(slots=True)
class Observation:
    request_embedding: np.ndarray  # float32 [D]
    hit_embeddings: np.ndarray  # float32 [P, D]
    hit_features: np.ndarray  # float32 [P, K]
    hit_mask: np.ndarray  # float32 [P]


def hit_feature_row(similarity: float, *, kind: int, cache_value: float, use_count: int, age_s: float,
                    rank: int, top_p: int, top_similarity: float, verifier_score: float | None = None,
                    cross_language: bool = False) -> np.ndarray:
    """The ``K`` scalars of one hit (exposed so tests and the docs can see the exact scaling).
    ``verifier_score`` None: the hit was not verified."""
    s = float(similarity)
    verified = verifier_score is not None and math.isfinite(float(verifier_score))
    return np.array(
        [
            s,
            math.log10(max(1.0 - s, 1e-4)) / 4.0,
            float(kind),
            float(cache_value),
            math.log1p(max(0, int(use_count))) / 5.0,
            math.log1p(max(0.0, float(age_s))) / 15.0,
            rank / float(top_p),
            max(0.0, float(top_similarity) - s),
            min(1.0, max(0.0, float(verifier_score))) if verified else 0.0,
            1.0 if verified else 0.0,
            1.0 if cross_language else 0.0,
        ],
        dtype=np.float32,
    )


def entry_language(entry: Any) -> str | None:
    """The ``language_tag`` of a cached entry's question: its ``language`` attribute when it has one (the
    simulator's entries carry it), else computed from ``entry.question`` (the proxy's ``CacheEntry``)."""
    tag = getattr(entry, "language", None)
    if tag is None and getattr(entry, "question", None):
        tag = language_tag(entry.question)
    return tag


def build_observation(request_embedding: np.ndarray, hits: Sequence[Any], *, top_p: int, now: float,
                      scores: Mapping[int, float] | None = None, request_language: str | None = None) -> Observation:
    """Observation of one request from the store's hits (``Hit(entry, similarity)``, best first).

    ``scores``: the pair verifier's score per hit index (the hits it verified); None or missing
    indices: not verified. ``request_language``: the request question's ``language.language_tag``
    (None: unknown, and no hit counts as in another language).

    Only the first ``top_p`` hits are used; missing ones are zero rows with mask 0. ``hits`` may be
    any objects with ``.similarity`` and ``.entry`` (``.vector``, ``.kind``, ``.cache_value``,
    ``.use_count``, ``.created_at``), so the simulator can pass thin equivalents of ``Hit``.
    """
    u = np.asarray(request_embedding, dtype=np.float32).reshape(-1)
    d = u.shape[0]
    hit_emb = np.zeros((top_p, d), dtype=np.float32)
    feats = np.zeros((top_p, K), dtype=np.float32)
    mask = np.zeros(top_p, dtype=np.float32)
    hits = list(hits)[:top_p]
    if hits:
        top = float(hits[0].similarity)
        for i, h in enumerate(hits):
            e = h.entry
            hit_emb[i] = np.asarray(e.vector, dtype=np.float32).reshape(-1)
            feats[i] = hit_feature_row(
                h.similarity, kind=e.kind, cache_value=e.cache_value, use_count=e.use_count,
                age_s=now - e.created_at, rank=i, top_p=top_p, top_similarity=top,
                verifier_score=scores.get(i) if scores else None,
                cross_language=request_language is not None and tags_differ(request_language, entry_language(e)),
            )
            mask[i] = 1.0
    return Observation(u, hit_emb, feats, mask)


def stack_observations(obs: Sequence[Observation]) -> dict[str, np.ndarray]:
    """Batch observations into the actor's inputs, keyed by the ONNX input names."""
    return {
        "request_embedding": np.stack([o.request_embedding for o in obs]).astype(np.float32, copy=False),
        "hit_embeddings": np.stack([o.hit_embeddings for o in obs]).astype(np.float32, copy=False),
        "hit_features": np.stack([o.hit_features for o in obs]).astype(np.float32, copy=False),
        "hit_mask": np.stack([o.hit_mask for o in obs]).astype(np.float32, copy=False),
    }


def select_entry(hits: Sequence[Any], *, value_weight: float = SELECT_VALUE_WEIGHT, top_p: int | None = None) -> int | None:
    """Eq. 4 (our reading): index of the hit that A serves and C puts in the prompt.

    score_i = similarity_i + value_weight * cache_value_i over the first ``top_p`` hits; the best
    score wins, ties go to the better-ranked hit. With the default weight the cache value only breaks
    near-ties between almost equally similar entries (a proven entry beats an unproven twin).
    Returns None when there is no hit.
    """
    hits = list(hits)[: top_p or None]
    if not hits:
        return None
    scores = [float(h.similarity) + value_weight * float(h.entry.cache_value) for h in hits]
    return int(np.argmax(scores))


def select_entry_from_features(hit_features: np.ndarray, hit_mask: np.ndarray, *,
                               value_weight: float = SELECT_VALUE_WEIGHT) -> np.ndarray:
    """Vectorised ``select_entry`` on observations ``[..., P, K]`` / ``[..., P]`` (index per row;
    rows without hits give 0, check the mask)."""
    sim = hit_features[..., HIT_FEATURE_NAMES.index("similarity")]
    val = hit_features[..., HIT_FEATURE_NAMES.index("cache_value")]
    score = np.where(hit_mask > 0, sim + value_weight * val, -np.inf)
    return np.argmax(score, axis=-1)
