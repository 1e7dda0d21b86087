"""The pair verifier's scores inside the simulator: the same verifier and the same rule for which hits
are verified (``velo_proxy.verifier.VerifyRule.candidates``) as the proxy, so that the hit features
``verifier_score`` / ``verified`` (``velo_proxy.features``, version 2) mean the same in training and
serving.

Scoring a pair costs ~10 ms on 2 cores, and PPO visits millions of decisions, so the scores are made
once, in bulk: for every text of a stream split, every text of the same split above the cosine floor
(``STREAM_NEIGHBOURS`` at most: 25k pairs on the full dataset), and for the neighbour demonstrations,
which mix the ``train`` and the 48k-text ``pairs`` split, each text's ``DEMO_NEIGHBOURS`` nearest above
the floor (their caches hold no other text above the floor: ``train.collect_neighbour_demos``). A
verified hit outside the table is scored when met, in one batched call per step, and counted in
``PairScores.scored_late``. Scores are cached on disk (``ScoreCache``) by the verifier's
weights and the pair's text, so a rerun scores nothing.

    python -m policy.pair_scores            # the full dataset's table (what policy.reproduce uses)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from velo_proxy.verifier import VerifyRule

from .data import SPLITS, Dataset

#: Which texts can share a cache, and how many neighbours above the floor per text are scored up front:
#: the stream splits on their own (in practice all of them), the demonstrations' pool together.
STREAM_NEIGHBOURS = 64
DEMO_NEIGHBOURS = 3
POOLS: tuple[tuple[tuple[str, ...], int], ...] = ((("train",), STREAM_NEIGHBOURS), (("val",), STREAM_NEIGHBOURS),
                                                  (("test",), STREAM_NEIGHBOURS), (("train", "pairs"), DEMO_NEIGHBOURS))

Scorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


@dataclass
class PairScores:
    """Verifier scores of (request text, cached text) index pairs, and the rule choosing which hits get one."""

    rule: VerifyRule
    """``cosine_floor`` and ``top_k`` as the proxy serves with (the threshold is not used here)."""
    verifier_key: str
    """Which verifier made the scores (weights and precision)."""
    table: dict[tuple[int, int], float] = field(default_factory=dict)
    scored_late: int = 0
    """Pairs that were not in the bulk table and were scored when the simulator met them."""
    _scorer: Scorer | None = field(default=None, repr=False)
    _by_request: dict[int, set[int]] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # the verifier session does not pickle; it reloads lazily
        return {**self.__dict__, "_scorer": None, "_by_request": None}

    def scored_neighbours(self, q: int) -> set[int]:
        """The texts whose pair with request ``q`` is in the table."""
        if self._by_request is None:
            self._by_request = {}
            for a, b in self.table:
                self._by_request.setdefault(a, set()).add(b)
        return self._by_request.get(int(q), set())

    def _score(self, data: Dataset, pairs: list[tuple[int, int]]) -> None:
        if self._scorer is None:
            self._scorer = load_scorer(self.verifier_key)[0]
        values = self._scorer([data.q_text[q] for q, _ in pairs], [data.q_text[j] for _, j in pairs])
        self.table.update({p: float(v) for p, v in zip(pairs, values)})
        self.scored_late += len(pairs)

    def lookup(self, data: Dataset, requests: Sequence[tuple[int, Sequence[Any]]]) -> list[dict[int, float]]:
        """For each (request text index, its hits best first): {hit index: score} of the hits the rule
        verifies (a hit's ``entry.qid`` is its cached text). Pairs not in the table are scored in one call."""
        wanted = []
        for q, hits in requests:
            idx = self.rule.candidates([h.similarity for h in hits])
            wanted.append([(i, (int(q), int(hits[i].entry.qid))) for i in idx])
        missing = list({p for row in wanted for _, p in row if p not in self.table})
        if missing:
            self._score(data, missing)
        return [{i: self.table[p] for i, p in row} for row in wanted]


def load_scorer(verifier_key: str | None = None, verifier_dir: Path | None = None, *,
                embedder_id: str | None = None, progress: bool = False) -> tuple[Scorer, VerifyRule, str]:
    """The installed verifier's bulk scorer (``velo-proxy models export`` puts it in place), disk-cached
    (``ScoreCache``), with its serving rule for ``embedder_id``'s vectors (the verifier's calibration block
    of that embedder: its cosine floor, as the proxy uses it) and its key; ``verifier_key``: refuse
    another verifier."""
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    from .verifier_calibrate import ScoreCache

    # the simulator trains the learned policy: its hit features are the scores of the verifier it is served with
    verifier = PairVerifier(verifier_dir or Settings(policy="learned").verifier_dir, threads=2, embedder_id=embedder_id)
    cache = ScoreCache()
    key = cache.model_key(verifier)
    if verifier_key is not None and key != verifier_key:
        raise RuntimeError(f"the installed verifier ({key}) is not the one these scores were "
                           f"made with ({verifier_key}); rebuild them with `python -m policy.pair_scores`")
    scorer: Scorer = lambda qa, qb: cache.score(verifier, list(qa), list(qb), progress=progress)  # noqa: E731
    return scorer, verifier.rule(1.0), key


def neighbour_pairs(data: Dataset, *, floor: float, pools=POOLS) -> list[tuple[int, int]]:
    """(request, cached) text pairs worth scoring up front: per pool, each text's most similar texts
    above ``floor`` (as many as the pool says), as ordered pairs."""
    pairs: set[tuple[int, int]] = set()
    split_of_text = data.c_split[data.q_cluster]
    for pool, neighbours in pools:
        idx = np.flatnonzero(np.isin(split_of_text, [SPLITS.index(s) for s in pool]))
        if len(idx) < 2:
            continue
        emb = np.ascontiguousarray(data.q_emb[idx], dtype=np.float32)
        k = min(neighbours, len(idx) - 1)
        for a in range(0, len(idx), 1024):
            s = emb[a:a + 1024] @ emb.T
            s[np.arange(s.shape[0]), np.arange(a, a + s.shape[0])] = -np.inf
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            rows, cols = np.nonzero(np.take_along_axis(s, part, axis=1) >= floor)
            pairs.update(zip(idx[a + rows].tolist(), idx[part[rows, cols]].tolist()))
    return sorted(pairs)


def build_pair_scores(data: Dataset, *, rule: VerifyRule, scorer: Scorer, verifier_key: str,
                      pools=POOLS) -> PairScores:
    pairs = neighbour_pairs(data, floor=rule.cosine_floor, pools=pools)
    values = scorer([data.q_text[q] for q, _ in pairs], [data.q_text[j] for _, j in pairs]) if pairs else []
    return PairScores(rule=rule, verifier_key=verifier_key, table={p: float(v) for p, v in zip(pairs, values)},
                      _scorer=scorer)


def attach_installed_verifier(data: Dataset, *, verifier_dir: Path | None = None, pools=POOLS,
                              progress: bool = True) -> PairScores:
    """Score ``data`` with the installed verifier (its own cosine floor and top_k) and attach the table
    as ``data.pair_scores``: from then on the simulator's observations carry verifier scores."""
    scorer, rule, key = load_scorer(verifier_dir=verifier_dir, embedder_id=data.embedder_id, progress=progress)
    data.pair_scores = build_pair_scores(data, rule=rule, scorer=scorer, verifier_key=key,
                                         pools=pools)
    return data.pair_scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny dataset")
    a = ap.parse_args(argv)
    from .data import DataSpec, build_dataset

    t0 = time.time()
    data = build_dataset(DataSpec.tiny() if a.tiny else DataSpec())
    ps = attach_installed_verifier(data)
    print(f"{len(ps.table)} pairs scored for {len(data.q_text)} texts in {time.time() - t0:.0f}s "
          f"(rule: floor {ps.rule.cosine_floor}, top_k {ps.rule.top_k}; verifier {ps.verifier_key})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
