"""The simulator's request data, built from the real datasets in ``data_dir()`` (``../shared/data`` by default,
setting ``VELO_DATASETS_DIR``; the tests use the slices in ``tests/data``).

Every request belongs to a *cluster* (one meaning): a QQP duplicate cluster (union of labelled
duplicate pairs), one XQuAD question in five languages (the paper's five-language expansion), one
oasst1 prompt, one NQ-open question. Clusters are grouped (QQP: clusters joined by a labelled
*non-duplicate* pair — the near misses — share a group) and groups are split train / validation /
test, so no question and no near-miss pair straddles two splits.

Each cluster has a reference answer embedding (satisfaction, Eq. 2, is measured against it) and,
where the data has them, real alternative answers:
- oasst1: a prompt with several human replies has as reference their consensus (the normalised mean
  of the reply embeddings: what the good answers share) and each reply is a real sample of what "the
  cloud LLM" answers; a prompt with one reply has that reply as reference;
- XQuAD: the English answer text; NQ-open: the first answer string;
- QQP has no answers: each cluster gets its own reference "answer identity", a unit vector drawn from
  a seeded generator, so two clusters' answers are as far apart as two unrelated answers and a hit on
  a near miss (non-duplicate) is a wrong answer, whatever the questions' similarity.

Embeddings come from the project's embedder (``velo_proxy.embedder.OnnxEmbedder``) and are cached in
SQLite under ``~/.cache/velo-proxy/sim`` keyed by (embedder id, sha256 of the text).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SOURCES = ("qqp", "xquad", "oasst1", "nq", "sts")
#: ``pairs``: labelled pairs for training demonstrations only (``collect_neighbour_demos``); never in
#: a request stream, and sharing no text with the other splits.
SPLITS = ("train", "val", "test", "pairs")
XQUAD_LANGS = ("en", "es", "de", "ru", "zh")
#: Sources whose answers are short strings (a name, a date, a number): judged by exact match, not by
#: embedding distance (MiniLM puts "1972" next to "1988"), see ``answer_identity``.
SHORT_ANSWER_SOURCES = ("xquad", "nq")
#: Bump when the dataset construction changes (part of the cache key of built datasets).
DATA_VERSION = 4
CONSENSUS = "<consensus of the replies>"


def normalise_answer(text: str) -> str:
    """SQuAD/NQ-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    t = text.lower()
    t = "".join(ch for ch in t if ch not in set(string.punctuation))
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def answer_identity(text: str, dim: int) -> np.ndarray:
    """A unit vector determined by the normalised answer string: equal answers (exact match, the NQ /
    SQuAD metric) coincide, different ones are as far apart as unrelated answers (~sqrt 2)."""
    seed = int.from_bytes(hashlib.sha256(normalise_answer(text).encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


#: The setting naming the datasets directory (laid out like ``../shared/data``: ``pairs/``, ``qa/``, ``sts/``),
#: read by training, ``python -m policy.reproduce`` (``--data-dir``) and the benchmarks (``--data-dir``).
DATASETS_ENV = "VELO_DATASETS_DIR"


class DatasetsMissing(FileNotFoundError):
    """The evaluation datasets are not where the setting (or the default) says."""


def default_data_dir() -> Path:
    """``../shared/data`` next to the repository root."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The datasets directory: ``path`` if given, else the setting ``VELO_DATASETS_DIR``, else
    ``../shared/data`` next to the repository when it is there. Raises ``DatasetsMissing`` naming the
    setting otherwise."""
    chosen = path or os.environ.get(DATASETS_ENV)
    if chosen:
        p = Path(chosen).expanduser()
        if not p.is_dir():
            raise DatasetsMissing(f"datasets directory {p} (from {'--data-dir' if path else DATASETS_ENV}) "
                                  "does not exist")
        return p
    default = default_data_dir()
    if default.is_dir():
        return default
    raise DatasetsMissing(f"no datasets directory: set {DATASETS_ENV} (or pass --data-dir) to a directory laid out "
                          f"like ../shared/data (pairs/, qa/, sts/); the default {default} does not exist")


def cache_dir() -> Path:
    base = os.environ.get("VELO_SIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "velo-proxy", "sim")
    p = Path(base)
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- embeddings ---------------------------------------------------------------------------------


class EmbeddingCache:
    """Disk cache of text embeddings keyed by (embedder id, sha256(text))."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "embeddings.sqlite"
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (embedder TEXT, key TEXT, vec BLOB, PRIMARY KEY (embedder, key))")

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get_many(self, embedder_id: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        keys = [self.key(t) for t in texts]
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, vec FROM emb WHERE embedder=? AND key IN ({','.join('?' * len(chunk))})"
            for k, blob in self._db.execute(q, [embedder_id, *chunk]):
                out[k] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, embedder_id: str, texts: Sequence[str], vecs: np.ndarray) -> None:
        rows = [(embedder_id, self.key(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in zip(texts, vecs)]
        self._db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?)", rows)
        self._db.commit()


def load_embedder(threads: int = 2):
    """The project's real embedder (``Settings().embedder_dir``)."""
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings

    return OnnxEmbedder(Settings().embedder_dir, threads=threads)


#: The embedder in whose space the simulator judges answers (Eq. 2's e(.)), whatever embedder the proxy
#: searches with: rewards of policies trained for different embedders are then one scale, and the QoS
#: constants measured in it (``QoSConfig.translation_distance``, the LLM answer distance) stay true.
#: multilingual-e5-small compresses distances (unrelated texts at ~0.74 cosine), which would shrink every
#: quality difference next to the delay term and make serving wrong answers cheaper.
ANSWER_JUDGE_NAME = "all-MiniLM-L6-v2"


def answer_judge_dir() -> Path:
    """The judge's exported model: beside the configured embedder's directory (the image's
    /opt/velo/models/<name> layout), else under the data home (``velo-proxy models export``)."""
    from velo_proxy.settings import Settings, default_home

    beside = Settings().embedder_dir.parent / ANSWER_JUDGE_NAME
    return beside if (beside / "model.onnx").exists() else default_home() / "models" / ANSWER_JUDGE_NAME


def load_answer_judge(embedder=None, threads: int = 2):
    """The answer judge; ``embedder`` itself when it is the judge already (MiniLM fp32)."""
    from velo_proxy.embedder import OnnxEmbedder

    judge_dir = answer_judge_dir()
    if embedder is not None and Path(getattr(embedder, "model_dir", "")).resolve() == judge_dir.resolve():
        return embedder
    if not (judge_dir / "model.onnx").exists():
        raise FileNotFoundError(f"the simulator's answer judge {ANSWER_JUDGE_NAME} is not exported at {judge_dir}: "
                                f"run 'velo-proxy models export' (it is the default embedder)")
    return OnnxEmbedder(judge_dir, threads=threads)


def embed_texts(texts: Sequence[str], embedder=None, *, cache: EmbeddingCache | None = None,
                progress: bool = True) -> tuple[np.ndarray, str]:
    """Embeddings [n, D] of ``texts`` (cached on disk) and the embedder id."""
    embedder = embedder or load_embedder()
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32), embedder.id
    cache = cache or EmbeddingCache()
    uniq = list(dict.fromkeys(texts))
    have = cache.get_many(embedder.id, uniq)
    missing = [t for t in uniq if EmbeddingCache.key(t) not in have]
    if missing:
        it = range(0, len(missing), 256)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"embedding {len(missing)} texts", unit="batch")
        for i in it:
            chunk = missing[i : i + 256]
            vecs = embedder.embed_sync(chunk, batch_size=32)
            cache.put_many(embedder.id, chunk, vecs)
            for t, v in zip(chunk, vecs):
                have[EmbeddingCache.key(t)] = np.asarray(v, dtype=np.float32)
    out = np.stack([have[EmbeddingCache.key(t)] for t in texts]).astype(np.float32)
    return out, embedder.id


# --- dataset ------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """How much of each dataset to use (the full run stays under ~25k texts)."""

    qqp_duplicate_pairs: int = 2500
    """QQP duplicate pairs sampled (their transitive closure among sampled texts forms clusters)."""
    qqp_near_miss_pairs: int = 2500
    """QQP labelled non-duplicate pairs sampled: the near misses."""
    xquad_questions: int = 890
    """XQuAD rows (each = one question in five languages + its answer)."""
    nq_questions: int = 1500
    """NQ-open questions (with their first short answer)."""
    oasst1_prompts: int = 1000
    """oasst1 prompts with at least one reply (the validation slice has ~480)."""
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Share of groups in train / val / test."""
    qqp_pair_rows: int = 15000
    """More QQP rows (duplicates and not, as they come in the file) for the ``pairs`` split: training
    demonstrations only. Rows that share a text with the sampled ones above are left out, so no text
    of validation or test is among them."""
    sts_rows: int = 2000
    """STS-B *train* rows (not used by any benchmark) for the ``pairs`` split: each sentence in the five
    XQuAD languages is one cluster (translations are the same request, as in XQuAD); a row's two
    sentences are one cluster when scored >= ``sts_duplicate_score``, near misses (one group) when
    scored >= ``sts_near_miss_score``."""
    sts_duplicate_score: float = 4.6
    """STS-B score from which a row's two sentences count as the same request (5 = equivalent)."""
    sts_near_miss_score: float = 2.5
    """STS-B score from which a row's two sentences are near misses of each other."""
    seed: int = 0
    """Sampling and split seed."""

    @classmethod
    def tiny(cls) -> "DataSpec":
        """A few hundred texts, for the tests."""
        return cls(qqp_duplicate_pairs=80, qqp_near_miss_pairs=80, xquad_questions=24, nq_questions=30, oasst1_prompts=30,
                   qqp_pair_rows=150, sts_rows=40)


@dataclass
class Dataset:
    """Requests, clusters and answers, as arrays. Index conventions in the field comments."""

    embedder_id: str  # the serving embedder: q_emb's space
    q_emb: np.ndarray  # [Nq, D] request embeddings
    q_cluster: np.ndarray  # [Nq] cluster of each request text
    q_text: list[str]
    c_source: np.ndarray  # [Nc] index into SOURCES
    c_group: np.ndarray  # [Nc] group id (near-miss partners share one)
    c_split: np.ndarray  # [Nc] index into SPLITS
    c_ref: np.ndarray  # [Nc, D] reference answer embedding (the answer judge's space)
    c_members: list[np.ndarray]  # per cluster: request indices
    c_answers: list[np.ndarray]  # per cluster: rows of a_emb that are real alternative (LLM) answers
    a_emb: np.ndarray  # [Na, D] alternative answers (the answer judge's space)
    llm_distance: float  # median L2 distance of an oasst1 reply to its prompt's consensus, measured
    answer_judge_id: str = ""  # the embedder of c_ref and a_emb (ANSWER_JUDGE_NAME's id; "" = embedder_id)
    meta: dict = field(default_factory=dict)
    pair_scores: Any = None  # policy.pair_scores.PairScores: the verifier's scores (None: no hit is verified)

    @property
    def dim(self) -> int:
        return int(self.q_emb.shape[1])

    def clusters(self, split: str, source: str | None = None) -> np.ndarray:
        m = self.c_split == SPLITS.index(split)
        if source is not None:
            m &= self.c_source == SOURCES.index(source)
        return np.flatnonzero(m)


class _UF:
    def __init__(self) -> None:
        self.p: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.p.setdefault(x, x)
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _require(path: Path) -> Path:
    if not path.exists():
        raise DatasetsMissing(f"{path} is missing: the simulator needs the datasets directory laid out like "
                              f"../shared/data (setting {DATASETS_ENV})")
    return path


def collect_texts(spec: DataSpec) -> dict:
    """Pick the texts and cluster structure (no embeddings yet). Deterministic for ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    root = data_dir()
    clusters: list[dict] = []  # {source, group, members: [text], ref: text|None, answers: [text]}

    # QQP: duplicates -> clusters, non-duplicates -> near-miss links between clusters.
    rows = _read_jsonl(_require(root / "pairs" / "qqp-dev.jsonl"))
    rows = [r for r in rows if r["q1"].strip() and r["q2"].strip() and r["q1"].strip() != r["q2"].strip()]
    dup = [r for r in rows if r["duplicate"] == 1]
    non = [r for r in rows if r["duplicate"] == 0]
    pick_d = [dup[i] for i in rng.choice(len(dup), size=min(spec.qqp_duplicate_pairs, len(dup)), replace=False)]
    pick_n = [non[i] for i in rng.choice(len(non), size=min(spec.qqp_near_miss_pairs, len(non)), replace=False)]
    texts = {t.strip() for r in pick_d + pick_n for t in (r["q1"], r["q2"])}
    for ms, group in _qqp_clusters(texts, dup, non):
        clusters.append({"source": "qqp", "group": "qqp:" + group, "members": ms, "ref": None, "answers": []})

    # XQuAD: one question in five languages.
    xq = _read_jsonl(_require(root / "qa" / "xquad-parallel-dev.jsonl"))
    for i in sorted(rng.choice(len(xq), size=min(spec.xquad_questions, len(xq)), replace=False)):
        r = xq[i]
        ms = list(dict.fromkeys(r[f"question_{lang}"].strip() for lang in XQUAD_LANGS if r.get(f"question_{lang}")))
        clusters.append({"source": "xquad", "group": "xq:" + r["id"], "members": ms, "ref": r["answer_en"].strip(), "answers": []})

    # oasst1: prompts with replies; best-ranked reply = reference, siblings = LLM answers.
    msgs = _read_jsonl(_require(root / "qa" / "oasst1-en-validation.jsonl"))
    replies: dict[str, list[dict]] = {}
    for m in msgs:
        if m["role"] == "assistant" and m.get("parent_id") and m["text"].strip():
            replies.setdefault(m["parent_id"], []).append(m)
    prompts = [m for m in msgs if m["role"] == "prompter" and m["message_id"] in replies and m["text"].strip()]
    for i in sorted(rng.choice(len(prompts), size=min(spec.oasst1_prompts, len(prompts)), replace=False)):
        p = prompts[i]
        rs = sorted(replies[p["message_id"]], key=lambda m: (m["rank"] if m["rank"] is not None else 99, m["message_id"]))
        texts_r = [m["text"].strip() for m in rs]
        clusters.append({"source": "oasst1", "group": "oa:" + p["message_id"], "members": [p["text"].strip()],
                         "ref": texts_r[0] if len(texts_r) == 1 else CONSENSUS,
                         "answers": texts_r if len(texts_r) > 1 else []})

    # NQ-open.
    nq = _read_jsonl(_require(root / "qa" / "nq-open-dev.jsonl"))
    for i in sorted(rng.choice(len(nq), size=min(spec.nq_questions, len(nq)), replace=False)):
        r = nq[i]
        clusters.append({"source": "nq", "group": f"nq:{i}", "members": [r["question"].strip()],
                         "ref": r["answer"][0].strip(), "answers": []})

    # A text in two clusters (rare: e.g. the same question in two datasets) stays in the first one.
    seen: set[str] = set()
    for c in clusters:
        c["members"] = [t for t in c["members"] if not (t in seen or seen.add(t))]
    clusters = [c for c in clusters if c["members"]]

    # Split by group, per source.
    fr = np.asarray(spec.split_fractions, dtype=float)
    fr = fr / fr.sum()
    split_of: dict[str, int] = {}
    for src in SOURCES:
        groups = sorted({c["group"] for c in clusters if c["source"] == src})
        order = rng.permutation(len(groups))
        n_tr = int(round(fr[0] * len(groups)))
        n_va = int(round(fr[1] * len(groups)))
        for rank, gi in enumerate(order):
            split_of[groups[gi]] = 0 if rank < n_tr else (1 if rank < n_tr + n_va else 2)
    for c in clusters:
        c["split"] = split_of[c["group"]]
    # Appended after the three splits, with their own generator: the stream splits stay as they were.
    clusters += _pair_clusters(spec, root, {t for c in clusters for t in c["members"]}, rows, dup, non)
    return {"clusters": clusters, "spec": spec}


def _qqp_clusters(texts: set[str], dup: list[dict], non: list[dict]) -> list[tuple[list[str], str]]:
    """(members, group) of the QQP texts: the transitive closure of every labelled duplicate edge among
    them forms a cluster; clusters joined by a labelled non-duplicate edge (near misses) share a group."""
    uf, guf = _UF(), _UF()
    for t in texts:
        uf.find(t)
    for r in dup:
        a, b = r["q1"].strip(), r["q2"].strip()
        if a in texts and b in texts:
            uf.union(a, b)
    members: dict[str, list[str]] = {}
    for t in sorted(texts):
        members.setdefault(uf.find(t), []).append(t)
    for c in members:
        guf.find(c)
    for r in non:
        a, b = r["q1"].strip(), r["q2"].strip()
        if a in texts and b in texts and uf.find(a) != uf.find(b):
            guf.union(uf.find(a), uf.find(b))
    return [(ms, guf.find(c)) for c, ms in members.items()]


def training_texts(spec: DataSpec | None = None) -> set[str]:
    """Every text the policy is trained on (the ``train`` and ``pairs`` splits): benchmarks that
    measure a learned policy leave them out of their workloads (``benchmarks/quality.py``)."""
    col = collect_texts(spec or DataSpec())
    return {t for c in col["clusters"] if c["split"] in (SPLITS.index("train"), SPLITS.index("pairs"))
            for t in c["members"]}


def _pair_clusters(spec: DataSpec, root: Path, taken: set[str], qqp_rows: list[dict], qqp_dup: list[dict],
                   qqp_non: list[dict]) -> list[dict]:
    """Clusters of the ``pairs`` split: more QQP rows and cross-lingual STS-B train sentences."""
    rng = np.random.default_rng(spec.seed + 2)
    out: list[dict] = []
    split = SPLITS.index("pairs")
    free = [r for r in qqp_rows if r["q1"].strip() not in taken and r["q2"].strip() not in taken]
    pick = [free[i] for i in sorted(rng.choice(len(free), size=min(spec.qqp_pair_rows, len(free)), replace=False))]
    texts = {t.strip() for r in pick for t in (r["q1"], r["q2"])}
    for ms, group in _qqp_clusters(texts, qqp_dup, qqp_non):
        out.append({"source": "qqp", "group": "qqp-pairs:" + group, "members": ms, "ref": None, "answers": [],
                    "split": split})

    if spec.sts_rows > 0:
        per_lang = {lang: _read_sts(_require(root / "sts" / f"stsb-{lang}-train.csv")) for lang in XQUAD_LANGS}
        n = min(len(v) for v in per_lang.values())
        for i in sorted(rng.choice(n, size=min(spec.sts_rows, n), replace=False)):
            score = per_lang["en"][i][2]
            s1 = [per_lang[lang][i][0] for lang in XQUAD_LANGS]
            s2 = [per_lang[lang][i][1] for lang in XQUAD_LANGS]
            group = f"sts:{i}" if score >= spec.sts_near_miss_score else None
            sides = [s1 + s2] if score >= spec.sts_duplicate_score else [s1, s2]
            for j, ms in enumerate(sides):
                ms = [t for t in dict.fromkeys(ms) if t and t not in taken]
                if ms:
                    out.append({"source": "sts", "group": group or f"sts:{i}:{j}", "members": ms, "ref": None,
                                "answers": [], "split": split})
    seen = set(taken)
    for c in out:  # a text in two clusters stays in the first one (as above)
        c["members"] = [t for t in c["members"] if not (t in seen or seen.add(t))]
    return [c for c in out if c["members"]]


def _read_sts(path: Path) -> list[tuple[str, str, float]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return [(r[0].strip(), r[1].strip(), float(r[2])) for r in csv.reader(f) if len(r) >= 3]


#: The retrain job's simulator texts, shipped in the package: ``collect_texts(retrain_spec())`` (texts, clusters and
#: splits, no embeddings), so ``velo-proxy retrain`` runs where no datasets directory is (a Kubernetes pod, a bare
#: install). Written by ``python -m policy.reproduce`` when it ships a policy; policy/snapshot/README.md.
SNAPSHOT = Path(__file__).resolve().parent / "snapshot" / "retrain-texts.json.gz"


def retrain_spec(spec: DataSpec | None = None) -> DataSpec:
    """The retrain job's data: training's spec without the training-only labelled pairs (they feed the
    neighbourhood demonstrations, which retraining does not use; ~48k fewer texts to embed)."""
    return replace(spec or DataSpec(), qqp_pair_rows=0, sts_rows=0)


def _spec_json(spec: DataSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def write_snapshot(spec: DataSpec, path: Path = SNAPSHOT) -> Path:
    """Write ``collect_texts(spec)`` (read from ``data_dir()``) as a deterministic gzipped JSON."""
    import gzip

    doc = {"data_version": DATA_VERSION, "spec": _spec_json(spec), "clusters": collect_texts(spec)["clusters"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return path


def read_snapshot(spec: DataSpec, path: Path = SNAPSHOT) -> dict | None:
    """``collect_texts(spec)`` from a snapshot, or None when there is none for this spec and DATA_VERSION."""
    import gzip

    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("data_version") != DATA_VERSION or doc.get("spec") != _spec_json(spec):
        return None
    return {"clusters": doc["clusters"], "spec": spec}


def collect_for(spec: DataSpec) -> tuple[dict, str]:
    """``collect_texts(spec)`` and where it came from: the package's snapshot when it was made for this spec
    (the same texts, without reading the datasets), else the datasets directory (``data_dir()``, which
    raises ``DatasetsMissing`` naming the setting when there is none)."""
    snap = read_snapshot(spec)
    if snap is not None:
        return snap, f"package snapshot {SNAPSHOT.parent.name}/{SNAPSHOT.name}"
    root = data_dir()
    return collect_texts(spec), f"datasets directory {root}"


def dataset_key(spec: DataSpec, source: str, embedder_id: str) -> str:
    """The cache key of a built dataset: the data version, the spec, where its texts came from (the same spec
    on tests/data slices is another dataset), the request embedder and the answer judge."""
    return hashlib.sha256(json.dumps([DATA_VERSION, asdict(spec), source, embedder_id, ANSWER_JUDGE_NAME],
                                     sort_keys=True).encode()).hexdigest()[:12]


def build_dataset(spec: DataSpec | None = None, embedder=None, *, answer_judge=None, progress: bool = True,
                  collected: dict | None = None) -> Dataset:
    """Collect texts (or take ``collected``, ``collect_texts``' output), embed them (disk-cached) and
    assemble the arrays. Requests are embedded by ``embedder`` (default: the configured one), answers by
    ``answer_judge`` (default: ``load_answer_judge``)."""
    spec = spec or DataSpec()
    col = collected if collected is not None else collect_texts(spec)
    clusters = col["clusters"]
    q_text = [t for c in clusters for t in c["members"]]
    ref_text = [c["ref"] for c in clusters
                if c["ref"] not in (None, CONSENSUS) and c["source"] not in SHORT_ANSWER_SOURCES]
    ans_text = [a for c in clusters for a in c["answers"]]
    embedder = embedder or load_embedder()
    q_emb, emb_id = embed_texts(q_text, embedder, progress=progress)
    # answers in the judge's space (``ANSWER_JUDGE_NAME``), requests in the serving embedder's
    answer_judge = load_answer_judge(embedder) if answer_judge is None else answer_judge
    ra_emb, judge_id = embed_texts(ref_text + ans_text, answer_judge, progress=progress)
    nr = len(ref_text)
    r_emb, a_emb = ra_emb[:nr], ra_emb[nr:]
    dim = ra_emb.shape[1]

    rng = np.random.default_rng(spec.seed + 1)  # QQP answer identities
    c_ref = np.zeros((len(clusters), dim), dtype=np.float32)
    q_cluster = np.zeros(len(q_text), dtype=np.int64)
    c_members, c_answers = [], []
    qi = ri = ai = 0
    group_ids: dict[str, int] = {}
    for ci, c in enumerate(clusters):
        n = len(c["members"])
        q_cluster[qi : qi + n] = ci
        c_members.append(np.arange(qi, qi + n))
        qi += n
        if c["ref"] is None:  # QQP: an answer identity per cluster
            v = rng.standard_normal(dim).astype(np.float32)
            c_ref[ci] = v / np.linalg.norm(v)
        elif c["source"] in SHORT_ANSWER_SOURCES:  # an identity per distinct (normalised) answer string
            c_ref[ci] = answer_identity(c["ref"], dim)
        elif c["ref"] == CONSENSUS:  # oasst1 with several replies: their consensus
            m = a_emb[ai : ai + len(c["answers"])].mean(axis=0)
            c_ref[ci] = m / np.linalg.norm(m)
        else:
            c_ref[ci] = r_emb[ri]
            ri += 1
        na = len(c["answers"])
        c_answers.append(np.arange(ai, ai + na))
        ai += na
        group_ids.setdefault(c["group"], len(group_ids))

    # The LLM's typical distance from the reference answer: oasst1 replies to their consensus, measured.
    dists = [float(np.linalg.norm(a_emb[j] - c_ref[ci])) for ci, idx in enumerate(c_answers) for j in idx]
    llm_distance = float(np.median(dists)) if dists else 0.8
    return Dataset(
        embedder_id=emb_id,
        answer_judge_id=judge_id,
        q_emb=q_emb,
        q_cluster=q_cluster,
        q_text=q_text,
        c_source=np.array([SOURCES.index(c["source"]) for c in clusters], dtype=np.int64),
        c_group=np.array([group_ids[c["group"]] for c in clusters], dtype=np.int64),
        c_split=np.array([c["split"] for c in clusters], dtype=np.int64),
        c_ref=c_ref,
        c_members=c_members,
        c_answers=c_answers,
        a_emb=a_emb if len(a_emb) else np.zeros((0, dim), dtype=np.float32),
        llm_distance=llm_distance,
        meta={"spec": spec.__dict__, "n_texts": len(q_text) + len(ref_text) + len(ans_text)},
    )


def synthetic_dataset(n_clusters: int = 60, dim: int = 32, seed: int = 0) -> Dataset:
    """A small random dataset (no embedder, no files) for unit tests of the simulator mechanics."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    q, qc, members = [], [], []
    for ci in range(n_clusters):
        m = []
        for _ in range(int(rng.integers(1, 4))):
            v = centers[ci] + 0.15 * rng.standard_normal(dim).astype(np.float32)
            q.append(v / np.linalg.norm(v))
            qc.append(ci)
            m.append(len(q) - 1)
        members.append(np.array(m))
    ref = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    return Dataset(
        embedder_id="synthetic",
        q_emb=np.stack(q).astype(np.float32),
        q_cluster=np.array(qc),
        q_text=[f"q{i}" for i in range(len(q))],
        c_source=np.arange(n_clusters) % SOURCES.index("sts"),  # the stream's sources (STS-B is training-only)
        c_group=np.arange(n_clusters) // 2,
        c_split=(np.arange(n_clusters) // 2) % 3,
        c_ref=ref,
        c_members=members,
        c_answers=[np.zeros(0, dtype=np.int64)] * n_clusters,
        a_emb=np.zeros((0, dim), dtype=np.float32),
        llm_distance=0.8,
    )


def translation_distance(embedder=None) -> dict[str, float]:
    """Median chord distance of an XQuAD answer in English to its translation, per language and over all
    (the simulator's ``QoSConfig.translation_distance``), next to two unrelated English answers'."""
    rows = _read_jsonl(_require(data_dir() / "qa" / "xquad-parallel-dev.jsonl"))
    embedder = embedder or load_answer_judge()
    vec = {lang: embed_texts([r[f"answer_{lang}"] for r in rows], embedder, progress=False)[0] for lang in XQUAD_LANGS}
    out = {lang: float(np.median(np.linalg.norm(vec["en"] - vec[lang], axis=1))) for lang in XQUAD_LANGS[1:]}
    out["all"] = float(np.median(np.concatenate([np.linalg.norm(vec["en"] - vec[lang], axis=1) for lang in XQUAD_LANGS[1:]])))
    shuffled = vec["en"][np.random.default_rng(0).permutation(len(rows))]
    out["unrelated"] = float(np.median(np.linalg.norm(vec["en"] - shuffled, axis=1)))
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Measurements behind the simulator's constants.")
    ap.add_argument("--translation-distance", action="store_true",
                    help="median MiniLM distance of an XQuAD answer to its translations (QoSConfig.translation_distance)")
    if ap.parse_args().translation_distance:
        print(json.dumps(translation_distance()))
    else:
        ap.print_help()
