"""Multi-edge simulator: N edge agents, each with its own cache, fed by a request stream of real
embeddings (``policy.data``). Observations are built by ``velo_proxy.features`` and cache values aged
by ``velo_proxy.cache_value``, exactly as in the proxy.

QoS model (docs/policy.md has the reasons):
- satisfaction q = -||e(returned answer) - e(reference answer)||_2 (Eq. 2);
- the cloud LLM's answer to a request (B) is a real sibling reply for oasst1 and otherwise the
  reference rotated by a random angle whose chord equals the measured oasst1 sibling distance;
- A returns the cached answer of the entry picked by Eq. 4 (``features.select_entry``): an LLM answer
  to the cached question, right if that question is in the request's cluster and language, wrong
  otherwise; a cached answer in another language (an XQuAD question cached in Spanish, asked in
  German) reaches the user as written, its embedding moved from the answer by the measured distance of
  an answer to its translation (``QoSConfig.translation_distance``), and counts as a false hit;
- C sends the prompt plus the Eq. 4 entry's Q&A to the LLM: with a relevant entry the answer is the
  normalised mix (1-lam)·a_B + lam·a_cached (lam = ``c_relevant_weight``: two independent answers to the
  same question, combined, land nearer the reference than either); with an irrelevant entry the LLM
  mostly ignores it (lam = ``c_irrelevant_weight``); either way it pays ``augment_s`` more delay. Across
  languages C is the right move: relevance is the cluster's (the LLM reads the cached Q&A and answers in
  the user's language), so the cached answer helps as it does within one language;
- delay d (Eq. 3): A = edge lookup; B = edge lookup + cloud; C = edge lookup + cloud + augment; plus
  the user-to-edge link of the answering edge;
- reward r = phi1 * (q - w * d) (Eq. 11 with w = phi2/phi1; phi1 = 10 is the paper's x10).

Request streams (``SimConfig.stream``):
``clusters`` (the default) — shaped like the proxy's benchmark and calibration workloads
(``benchmarks/quality.py``, ``policy/verifier_calibrate.py``): each region draws whole groups of the
split (a group holds near-miss clusters, so labelled near misses arrive interleaved with the
paraphrases), every text of them once, in random order; the first arrival of a cluster has no right
answer in the cache. ``zipf`` — the paper's: groups by Zipf popularity, a random member each time
(popular texts repeat, so the exact tier answers many).

Hit features include the pair verifier's score of the hits the serving rule verifies
(``policy.pair_scores``, attached to the dataset as ``data.pair_scores``; without it no hit is verified).

Modes (each step every region — the users nearest to one edge — sends one request):
``nearest`` — the request reaches its home edge only, which decides; ``all`` — the request reaches
all edges (the remote ones over a longer link), each decides with its own cache, the user takes the
fastest answer and every edge that decided gets that answer's reward; only the home edge stores a
new answer (its users' traffic), so the edges' caches differ and a remote edge can answer what the
home edge has not seen. ``EdgeSim.N`` is the number of decisions per step (E or E x E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from velo_proxy import cache_value as cv
from velo_proxy import features as F
from velo_proxy.language import language_tag, tags_differ

from .data import SOURCES, SPLITS, Dataset

A, B, C = F.ACTION_A, F.ACTION_B, F.ACTION_C


@dataclass
class QoSConfig:
    """Satisfaction, delay and reward model. Every field can be changed from the command line."""

    w: float = 0.1
    """Delay weight w = phi2/phi1 in Eq. 11."""
    phi1: float = 10.0
    """Scale of the reward (the paper's x10)."""
    cloud_s: float = 3.34
    """Cloud LLM response time, seconds (paper Table I, Qwen-14B)."""
    edge_s: float = 0.02
    """Edge lookup + decision, seconds (proxy measured: ~7 ms embed + search + policy). Paper: 0.8."""
    augment_s: float = 0.25
    """Extra cloud time of C: prefill of the added cached Q&A (~300 tokens), seconds."""
    link_s: float = 0.005
    """User -> nearest edge link delay, seconds."""
    link_hop_s: float = 0.03
    """Extra link delay per further edge (all-edges mode), seconds."""
    c_relevant_weight: float = 0.5
    """C with a relevant cached entry: weight of the cached answer in the LLM's answer."""
    c_irrelevant_weight: float = 0.1
    """C with an irrelevant entry: how much the wrong context leaks into the LLM's answer."""
    llm_distance: float | None = None
    """Chord distance of a synthetic LLM answer from the reference; None = measured on oasst1."""
    translation_distance: float = 1.20
    """Chord distance of a cached answer served across languages from the same answer in the user's
    language: the median all-MiniLM-L6-v2 distance of an XQuAD answer in English to its es/de/ru/zh
    translation (``python -m policy.data --translation-distance``: 1.202; es 0.94, de 0.90, ru 1.32,
    zh 1.28; two unrelated English answers 1.34)."""

    def reward(self, q: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        return self.phi1 * (q - self.w * d)


@dataclass
class SimConfig:
    """Simulator settings."""

    n_agents: int = 3
    """Number of edge agents N."""
    mode: str = "nearest"
    """'nearest' (each request to its nearest edge) or 'all' (each request to all edges, fastest wins)."""
    split: str = "train"
    """Which clusters the stream draws from: train, val or test."""
    top_p: int = 5
    """Hits per observation (P)."""
    capacity: int = 600
    """Entries per edge cache (size cap: the lowest cache value goes first)."""
    xi: int = 100
    """Every xi requests at an edge, drop entries older than ``grace_s`` valued below the mean."""
    grace_s: float = 150.0
    """Grace period of the below-mean rule, simulated seconds."""
    step_s: float = 1.0
    """Simulated seconds between two requests at one edge."""
    stream: str = "clusters"
    """'clusters' (benchmark-shaped: whole groups, each text once, shuffled) or 'zipf' (the paper's)."""
    zipf_s: float = 0.9
    """Zipf exponent of group popularity (zipf stream)."""
    source_weights: tuple[float, float, float, float] = (0.5, 0.25, 0.15, 0.1)
    """Share of requests from qqp, xquad, oasst1, nq."""
    episode_len: int = 500
    """Steps before the caches are emptied (training); evaluation runs one long episode."""
    reshuffle: bool = False
    """Draw a new popularity order of the groups at every episode (training: the policy must not learn
    which few groups happen to be popular; evaluation keeps the seed's order)."""
    seed: int = 0
    """Seed of the stream and of the LLM answer noise."""
    qos: QoSConfig = field(default_factory=QoSConfig)


@dataclass(slots=True)
class SimEntry:
    """Thin stand-in for ``velo_proxy.store.base.CacheEntry`` (same attribute names)."""

    vector: np.ndarray
    answer: np.ndarray  # embedding of the cached answer
    cluster: int
    created_at: float
    qid: int = -1  # request text it was stored for (the exact tier matches on it)
    language: str | None = None  # velo_proxy.language.language_tag of that text (features.entry_language)
    kind: int = 0
    use_count: int = 0
    cache_value: float = cv.INITIAL_VALUE


@dataclass(slots=True)
class SimHit:
    entry: SimEntry
    similarity: float


class EdgeCache:
    """One agent's store: exact cosine search over a preallocated matrix."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.capacity = capacity
        self.mat = np.zeros((capacity, dim), dtype=np.float32)
        self.entries: list[SimEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def search(self, u: np.ndarray, limit: int) -> list[SimHit]:
        n = len(self.entries)
        if n == 0:
            return []
        sims = self.mat[:n] @ u
        k = min(limit, n)
        idx = np.argpartition(-sims, k - 1)[:k] if n > k else np.arange(n)
        idx = idx[np.lexsort((idx, -sims[idx]))]
        return [SimHit(self.entries[i], float(sims[i])) for i in idx]

    def _remove(self, drop: np.ndarray) -> int:
        keep = np.flatnonzero(~drop)
        self.entries = [self.entries[i] for i in keep]
        self.mat[: len(keep)] = self.mat[keep]
        return int(drop.sum())

    def add(self, entry: SimEntry) -> None:
        if len(self.entries) >= self.capacity:  # size cap: drop the lowest value (oldest on ties)
            vals = np.array([e.cache_value for e in self.entries])
            drop = np.zeros(len(vals), dtype=bool)
            drop[int(np.argmin(vals))] = True
            self._remove(drop)
        self.mat[len(self.entries)] = entry.vector
        self.entries.append(entry)

    def evict_below_mean(self, now: float, grace_s: float) -> int:
        if not self.entries:
            return 0
        vals = np.array([e.cache_value for e in self.entries])
        ages = np.array([now - e.created_at for e in self.entries])
        return self._remove(cv.below_mean_mask(vals, ages, grace_s=grace_s))

    @staticmethod
    def record_use(entry: SimEntry, outcome: float) -> None:
        entry.cache_value, entry.use_count = cv.update_cache_value(entry.cache_value, entry.use_count, outcome)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


@dataclass
class StepInfo:
    """Per agent-decision outcome of one step (arrays of length N)."""

    action: np.ndarray  # executed action (A without a hit counts as B)
    q: np.ndarray
    delay: np.ndarray
    reward: np.ndarray
    hit: np.ndarray  # served from cache
    false_hit: np.ndarray  # served a wrong answer from cache
    relevant: np.ndarray  # the Eq. 4 entry was a true duplicate
    answered: np.ndarray  # this agent's answer reached the user (nearest: all; all-edges: the fastest)
    exact: np.ndarray  # answered by the exact tier (the policy was not asked)


class EdgeSim:
    """The environment. ``reset()`` -> observations; ``step(actions)`` -> (rewards [N], StepInfo, done)."""

    def __init__(self, data: Dataset, cfg: SimConfig) -> None:
        self.data = data
        self.cfg = cfg
        self.qos = cfg.qos
        self.E = cfg.n_agents  # edges (agents)
        if cfg.mode == "nearest":  # decision slot k: edge k decides on region k's request
            self.slot_edge = np.arange(self.E)
            self.slot_req = np.arange(self.E)
        elif cfg.mode == "all":  # slot k: edge k % E decides on region k // E's request
            self.slot_edge = np.tile(np.arange(self.E), self.E)
            self.slot_req = np.repeat(np.arange(self.E), self.E)
        else:
            raise ValueError(f"mode must be 'nearest' or 'all', not {cfg.mode!r}")
        self.N = len(self.slot_edge)  # decisions per step
        self.llm_distance = self.qos.llm_distance if self.qos.llm_distance is not None else data.llm_distance
        # Stream tables: per source, the groups of this split, Zipf-weighted in a seeded order.
        split = SPLITS.index(cfg.split)
        prng = np.random.default_rng(cfg.seed + 1000)
        self._src: list[tuple[int, list[np.ndarray], np.ndarray]] = []
        weights = []
        for si, _ in enumerate(SOURCES):
            cl = np.flatnonzero((data.c_split == split) & (data.c_source == si))
            if len(cl) == 0:
                continue
            groups: dict[int, list[int]] = {}
            for c in cl:
                groups.setdefault(int(data.c_group[c]), []).append(int(c))
            glist = [np.array(groups[g]) for g in sorted(groups)]
            glist = [glist[i] for i in prng.permutation(len(glist))]
            p = 1.0 / np.arange(1, len(glist) + 1) ** cfg.zipf_s
            self._src.append((si, glist, p / p.sum()))
            weights.append(cfg.source_weights[si])
        if not self._src:
            raise ValueError(f"no clusters in split {cfg.split!r}")
        w = np.asarray(weights, dtype=float)
        self._src_p = w / w.sum()
        if cfg.stream not in ("clusters", "zipf"):
            raise ValueError(f"stream must be 'clusters' or 'zipf', not {cfg.stream!r}")
        self._cand_cache: dict[int, list[np.ndarray]] = {}
        self._queues: list[list[int]] = [[] for _ in range(self.E)]  # clusters stream: texts to come, per region
        self._used: list[set[int]] = [set() for _ in self._src]  # clusters stream: groups drawn this episode
        # user (region r) -> edge e link: the home edge (e = r) is the nearest
        self.links = self.qos.link_s + np.abs(self.slot_edge - self.slot_req) * self.qos.link_hop_s
        self.q_lang = request_languages(data)
        self.reset()

    # --- stream -----------------------------------------------------------------------------

    def _draw_request(self, region: int) -> dict:
        rng = self.rng
        if self.cfg.stream == "clusters":
            if not self._queues[region]:
                self._fill_queue(region)
            qi = self._queues[region].pop()
            c = int(self.data.q_cluster[qi])
            return {"q": qi, "cluster": c, "llm": self._llm_answer(c)}
        si, glist, p = self._src[int(rng.choice(len(self._src), p=self._src_p))]
        g = glist[int(rng.choice(len(glist), p=p))]
        c = int(g[int(rng.integers(len(g)))])
        mem = self.data.c_members[c]
        qi = int(mem[int(rng.integers(len(mem)))])
        return {"q": qi, "cluster": c, "llm": self._llm_answer(c)}

    def _fill_queue(self, region: int) -> None:
        """Clusters stream: whole groups (source by ``source_weights``, group uniformly among those not
        drawn yet this episode) until one episode of requests, every text once, shuffled."""
        rng = self.rng
        texts: list[int] = []
        while len(texts) < self.cfg.episode_len:
            k = int(rng.choice(len(self._src), p=self._src_p))
            _, glist, _ = self._src[k]
            if len(self._used[k]) >= len(glist):
                self._used[k].clear()  # every group of this source drawn: start over
            free = [g for g in range(len(glist)) if g not in self._used[k]]
            g = free[int(rng.integers(len(free)))]
            self._used[k].add(g)
            texts.extend(int(q) for c in glist[g] for q in self.data.c_members[int(c)])
        order = rng.permutation(len(texts))
        self._queues[region] = [texts[i] for i in order]

    def _llm_answer(self, c: int) -> np.ndarray:
        """What the cloud LLM answers to a request of cluster c (sampled once per request)."""
        rng = self.rng
        alts = self.data.c_answers[c]
        if len(alts):
            return self.data.a_emb[int(alts[int(rng.integers(len(alts)))])]
        r = self.data.c_ref[c]
        g = rng.standard_normal(r.shape[0]).astype(np.float32)
        g -= float(g @ r) * r
        g = _unit(g)
        theta = 2.0 * math.asin(min(1.0, self.llm_distance / 2.0))
        return _unit(math.cos(theta) * r + math.sin(theta) * g)

    # --- episode ----------------------------------------------------------------------------

    def _reshuffle(self) -> None:
        self._src = [(si, [glist[i] for i in self.rng.permutation(len(glist))], p) for si, glist, p in self._src]

    def reset(self, seed: int | None = None) -> list[F.Observation]:
        if seed is not None or not hasattr(self, "rng"):
            self.rng = np.random.default_rng(self.cfg.seed if seed is None else seed)
        self.caches = [EdgeCache(self.data.dim, self.cfg.capacity) for _ in range(self.E)]
        self._new_episode_stream()
        self.t = 0
        self.requests_seen = np.zeros(self.E, dtype=np.int64)
        self._next_requests()
        return self.observations()

    def _new_episode_stream(self) -> None:
        self._queues = [[] for _ in range(self.E)]
        self._used = [set() for _ in self._src]

    @property
    def now(self) -> float:
        return self.t * self.cfg.step_s

    def _next_requests(self) -> None:
        regional = [self._draw_request(r) for r in range(self.E)]  # one new request per region
        self.requests = [regional[r] for r in self.slot_req]
        self.hits: list[list[SimHit]] = []
        self.sel: list[int | None] = []
        for i in range(self.N):
            u = self.data.q_emb[self.requests[i]["q"]]
            h = self.caches[self.slot_edge[i]].search(u, self.cfg.top_p)
            self.hits.append(h)
            self.sel.append(F.select_entry(h, top_p=self.cfg.top_p))
        self.scores = self._verify([(self.requests[i]["q"], self.hits[i]) for i in range(self.N)])
        # The proxy's exact tier answers a byte-identical question before the policy is asked.
        self.exact = [next((j for j, h in enumerate(self.hits[i]) if h.entry.qid == self.requests[i]["q"]), None)
                      for i in range(self.N)]

    def place_request(self, slot: int, q: int, cached: Sequence[int], created_at: Sequence[float]) -> None:
        """Put decision ``slot`` in a constructed state: request text ``q`` (its LLM answer drawn as in
        the stream) against a cache holding only the texts ``cached`` (best first; unused entries whose
        answers are LLM answers to their own questions). The exact tier does not answer. For expert
        demonstrations outside the stream (``train.collect_neighbour_demos``)."""
        u = self.data.q_emb[q]
        hits = []
        for j, t in zip(cached, created_at):
            c = int(self.data.q_cluster[j])
            entry = SimEntry(vector=self.data.q_emb[j], answer=self._llm_answer(c), cluster=c, created_at=float(t), qid=int(j),
                             language=self.q_lang[int(j)])
            hits.append(SimHit(entry, float(entry.vector @ u)))
        c = int(self.data.q_cluster[q])
        self.requests[slot] = {"q": int(q), "cluster": c, "llm": self._llm_answer(c)}
        self.hits[slot], self.sel[slot], self.exact[slot] = hits, F.select_entry(hits, top_p=self.cfg.top_p), None
        self.scores[slot] = self._verify([(int(q), hits)])[0]

    def _verify(self, requests: list[tuple[int, list[SimHit]]]) -> list[dict[int, float]]:
        """The verifier's scores of the hits the serving rule verifies, per decision (as the proxy)."""
        if self.data.pair_scores is None:
            return [{} for _ in requests]
        return self.data.pair_scores.lookup(self.data, requests)

    def observations(self) -> list[F.Observation]:
        return [F.build_observation(self.data.q_emb[self.requests[i]["q"]], self.hits[i], top_p=self.cfg.top_p,
                                    now=self.now, scores=self.scores[i], request_language=self.q_lang[self.requests[i]["q"]])
                for i in range(self.N)]

    def cross_language(self, i: int, j: int) -> bool:
        """Is hit j of decision i a question cached in another language than the request's?"""
        return tags_differ(self.q_lang[self.requests[i]["q"]], self.hits[i][j].entry.language)

    def servable(self, i: int, j: int) -> bool:
        """Would serving hit j as is (A) answer decision i: the same cluster and the same language."""
        return self.hits[i][j].entry.cluster == self.requests[i]["cluster"] and not self.cross_language(i, j)

    def _translated(self, e: SimEntry) -> np.ndarray:
        """The cached answer as a user of another language gets it: moved by ``translation_distance`` in a
        direction fixed per entry (seeded by its text), so the expert's expectation and the outcome agree."""
        a = e.answer
        g = np.random.default_rng(e.qid + 104729).standard_normal(a.shape[0]).astype(np.float32)
        g = _unit(g - float(g @ a) * a)
        theta = 2.0 * math.asin(min(1.0, self.qos.translation_distance / 2.0))
        return _unit(math.cos(theta) * a + math.sin(theta) * g)

    def true_duplicate_mask(self) -> np.ndarray:
        """[N, P]: which hits would answer the request as they are (its cluster and language: ``servable``;
        privileged: critic state, oracle, metrics)."""
        m = np.zeros((self.N, self.cfg.top_p), dtype=np.float32)
        for i in range(self.N):
            for j in range(len(self.hits[i])):
                m[i, j] = float(self.servable(i, j))
        return m

    def global_state(self, obs: Sequence[F.Observation], expected: np.ndarray | None = None) -> np.ndarray:
        """[N, S] per-agent state rows for the centralised critic (training only).

        Besides what the agents observe, a row holds privileged facts (legitimate for a CTDE critic,
        never seen by the actor): which hits are true duplicates and the expected immediate reward of
        each action (``expected_action_rewards``, /phi1; 0 and a flag when unavailable). The reward of a
        step depends mostly on the request (an oasst1 prompt is answered worse than a QQP question
        whatever the action); a critic that cannot see that leaves the advantage dominated by which
        request came, not by which action was taken."""
        dup = self.true_duplicate_mask()
        q = self.expected_action_rewards() if expected is None else expected
        avail = np.isfinite(q)
        qn = np.where(avail, q, 0.0) / self.qos.phi1
        rows = []
        for i, o in enumerate(obs):
            rows.append(np.concatenate([o.hit_features.reshape(-1), o.hit_mask, dup[i], qn[i], avail[i],
                                        [len(self.caches[self.slot_edge[i]]) / self.cfg.capacity, self.t / max(1, self.cfg.episode_len)]]))
        return np.asarray(rows, dtype=np.float32)

    # --- outcomes ---------------------------------------------------------------------------

    def _outcome(self, i: int, action: int, entry_idx: int | None = None) -> tuple[int, float, float, np.ndarray, bool | None]:
        """(executed action, q, delay, returned answer, relevance of the used entry) for agent i."""
        qos = self.qos
        req = self.requests[i]
        ref = self.data.c_ref[req["cluster"]]
        j = self.sel[i] if entry_idx is None else entry_idx
        if action != B and j is None:
            action = B  # A or C without any hit falls back to a plain forward
        if action == A:
            e = self.hits[i][j].entry
            ans, d, rel = e.answer, qos.edge_s, e.cluster == req["cluster"]
            if self.cross_language(i, j):  # the right answer in another language is not this user's answer
                ans, rel = self._translated(e), False
        elif action == B:
            ans, d, rel = req["llm"], qos.edge_s + qos.cloud_s, None
        else:
            e = self.hits[i][j].entry
            rel = e.cluster == req["cluster"]
            lam = qos.c_relevant_weight if rel else qos.c_irrelevant_weight
            ans = _unit((1.0 - lam) * req["llm"] + lam * e.answer)
            d = qos.edge_s + qos.cloud_s + qos.augment_s
        q = -float(np.linalg.norm(ans - ref))
        return action, q, d + float(self.links[i]), ans, rel

    def action_rewards(self, *, oracle_entry: bool = False) -> np.ndarray:
        """[N, 3] immediate reward of each action (the oracle's view: knows relevance and the LLM's
        answer). A/C without hits get -inf. ``oracle_entry``: A and C use the best true duplicate
        among the hits when there is one, instead of the Eq. 4 entry."""
        out = np.full((self.N, 3), -np.inf)
        dup = self.true_duplicate_mask() if oracle_entry else None
        for i in range(self.N):
            j = None
            if oracle_entry and dup[i].any():
                j = int(np.argmax(dup[i]))
            for a in (A, B, C):
                if a != B and self.sel[i] is None:
                    continue
                _, q, d, _, _ = self._outcome(i, a, j)
                out[i, a] = self.qos.reward(q, d)
        return out

    def _llm_candidates(self, c: int) -> list[np.ndarray]:
        """A fixed sample of what the LLM may answer for cluster c (its sibling replies, or four seeded
        synthetic answers): the expert's expectation over B's answer, without peeking at this one."""
        if c in self._cand_cache:
            return self._cand_cache[c]
        alts = self.data.c_answers[c]
        if len(alts):
            cands = [self.data.a_emb[int(j)] for j in alts]
        else:
            r = self.data.c_ref[c]
            g = np.random.default_rng(c + 7919).standard_normal((4, r.shape[0])).astype(np.float32)
            theta = 2.0 * math.asin(min(1.0, self.llm_distance / 2.0))
            cands = []
            for x in g:
                x = _unit(x - float(x @ r) * r)
                cands.append(_unit(math.cos(theta) * r + math.sin(theta) * x))
        self._cand_cache[c] = cands
        return cands

    def expected_action_rewards(self) -> np.ndarray:
        """[N, 3] expected immediate reward of each action with the Eq. 4 entry, knowing which hits are
        true duplicates but not the answer the LLM is about to give (expectation over ``_llm_candidates``).
        This is what the expert of Algorithm 1 maximises."""
        qos = self.qos
        out = np.full((self.N, 3), -np.inf)
        for i in range(self.N):
            req = self.requests[i]
            c = req["cluster"]
            ref = self.data.c_ref[c]
            cands = self._llm_candidates(c)
            link = float(self.links[i])
            qb = float(np.mean([-np.linalg.norm(a - ref) for a in cands]))
            out[i, B] = qos.reward(qb, qos.edge_s + qos.cloud_s + link)
            j = self.sel[i]
            if j is None:
                continue
            e = self.hits[i][j].entry
            rel = e.cluster == c
            served = self._translated(e) if self.cross_language(i, j) else e.answer
            out[i, A] = qos.reward(-float(np.linalg.norm(served - ref)), qos.edge_s + link)
            lam = qos.c_relevant_weight if rel else qos.c_irrelevant_weight
            qc = float(np.mean([-np.linalg.norm(_unit((1.0 - lam) * a + lam * e.answer) - ref) for a in cands]))
            out[i, C] = qos.reward(qc, qos.edge_s + qos.cloud_s + qos.augment_s + link)
        return out

    def expert_actions(self) -> np.ndarray:
        return np.argmax(self.expected_action_rewards(), axis=1)

    def oracle_actions(self, *, oracle_entry: bool = False) -> tuple[np.ndarray, list[int | None]]:
        r = self.action_rewards(oracle_entry=oracle_entry)
        acts = np.argmax(r, axis=1)
        entries: list[int | None] = []
        dup = self.true_duplicate_mask()
        for i in range(self.N):
            entries.append(int(np.argmax(dup[i])) if oracle_entry and dup[i].any() else None)
        return acts, entries

    def step(self, actions: Sequence[int], entries: Sequence[int | None] | None = None, *, exact_tier: bool = True
             ) -> tuple[np.ndarray, StepInfo, bool, list[F.Observation]]:
        """Apply one action per agent. With ``exact_tier`` (the proxy's default), a request whose exact
        text is cached at that edge is served from it (A) whatever the action, as the proxy's exact tier
        does before the policy runs; ``info.exact`` marks those decisions."""
        N = self.N
        actions = np.asarray(actions).copy()
        entries = list(entries) if entries is not None else [None] * N
        exact = np.zeros(N)
        if exact_tier:
            for i in range(N):
                if self.exact[i] is not None:
                    actions[i], entries[i], exact[i] = A, self.exact[i], 1.0
        z = lambda: np.zeros(N)  # noqa: E731
        info = StepInfo(action=np.zeros(N, dtype=np.int64), q=z(), delay=z(), reward=z(), hit=z(), false_hit=z(),
                        relevant=z(), answered=z(), exact=exact)
        answers = []
        for i in range(N):
            j = entries[i]
            act, q, d, ans, rel = self._outcome(i, int(actions[i]), j)
            info.action[i], info.q[i], info.delay[i] = act, q, d
            info.hit[i] = float(act == A)
            info.false_hit[i] = float(act == A and not rel)
            info.relevant[i] = float(bool(rel))
            answers.append(ans)
            jj = self.sel[i] if j is None else j
            if act in (A, C):  # a use of the entry: count it and fold its outcome into c^r (Eq. 5)
                EdgeCache.record_use(self.hits[i][jj].entry, 1.0 if rel else 0.0)
        if self.cfg.mode == "nearest":
            info.reward[:] = self.qos.reward(info.q, info.delay)
            info.answered[:] = 1.0
        else:  # per request, the user takes the fastest answer; every edge that decided on it gets its reward
            for r in range(self.E):
                ks = np.flatnonzero(self.slot_req == r)
                k = int(ks[np.argmin(info.delay[ks] + 1e-9 * np.arange(len(ks)))])
                info.reward[ks] = self.qos.reward(info.q[k], info.delay[k])
                info.answered[k] = 1.0
        # Inserts after B and C (the proxy stores every complete upstream answer) — at the home edge of
        # the request: in the all-edges mode a remote edge's forward only races for the user.
        for i in range(N):
            if info.action[i] in (B, C) and self.slot_edge[i] == self.slot_req[i]:
                req = self.requests[i]
                self.caches[self.slot_edge[i]].add(SimEntry(vector=self.data.q_emb[req["q"]], answer=answers[i],
                                                            cluster=req["cluster"], created_at=self.now, qid=req["q"],
                                                            language=self.q_lang[req["q"]]))
        before = self.requests_seen.copy()
        self.requests_seen += np.bincount(self.slot_edge, minlength=self.E)
        self.t += 1
        for e in range(self.E):
            if self.requests_seen[e] // self.cfg.xi > before[e] // self.cfg.xi:
                self.caches[e].evict_below_mean(self.now, self.cfg.grace_s)
        done = self.t >= self.cfg.episode_len
        if done:
            self.caches = [EdgeCache(self.data.dim, self.cfg.capacity) for _ in range(self.E)]
            self._new_episode_stream()
            self.t = 0
            if self.cfg.reshuffle:
                self._reshuffle()
        self._next_requests()
        return info.reward.copy(), info, done, self.observations()


def request_languages(data: Dataset) -> list[str | None]:
    """``language_tag`` of every request text, computed once per dataset object (kept in ``data.meta``)."""
    tags = data.meta.get("q_language")
    if tags is None or len(tags) != len(data.q_text):
        tags = data.meta["q_language"] = [language_tag(t) for t in data.q_text]
    return tags


def make_sim(data: Dataset, **overrides) -> EdgeSim:
    qos_over = {k[4:]: overrides.pop(k) for k in list(overrides) if k.startswith("qos_")}
    cfg = SimConfig(**overrides)
    if qos_over:
        cfg = replace(cfg, qos=replace(cfg.qos, **qos_over))
    return EdgeSim(data, cfg)
