"""The pair verifier: P(the cached answer answers the new question), read from both questions together.

A sentence vector keeps the words of a question, not their order, direction or negation: "convert a
string to an int" and "convert an int to a string" score 0.99 with MiniLM. The verifier is a
cross-encoder (MiniLM's layers, fine-tuned by ``policy/verifier_train.py``) that reads
``[CLS] new question [SEP] cached question [SEP]`` and returns a score in [0, 1].

``PairVerifier`` runs the exported ONNX model with onnxruntime and the model's ``tokenizer.json``
(no torch) on one dedicated worker thread, so the event loop never blocks on it; on the request path
(``score``) the pairs of concurrent requests are micro-batched into one onnxruntime call, like the
embedder's texts (``velo_proxy.batching.MicroBatcher``). The serving rule is
here too (``VerifyRule``), the one place the proxy, the calibration and the benchmarks take it from:
verify at most ``top_k`` hits whose cosine similarity reaches ``cosine_floor``, in one batched call,
and serve the best-scored one when its score reaches the threshold calibrated for the operator's
false-hit bound (``threshold_for``).

The model directory (written by ``velo-proxy models export``) holds ``model.onnx``,
``tokenizer.json`` and ``velo_verifier.json`` (id, embedder id, max_length, precision, calibration;
``pad_id``/``pad_token`` when they are not BERT's). Two verifiers have this contract: the English one
(MiniLM, ``velo_proxy.verifier_export``) and the multilingual one (multilingual-e5-small, no
``token_type_ids`` input, ``velo_proxy.e5_verifier_export``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from velo_proxy.batching import MicroBatcher

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "velo_verifier.json"
EXPORT_HINT = "run `velo-proxy models export` to create it (or set VELO_VERIFIER_DIR)"
#: Characters of a question the verifier reads at most (the tokenizer keeps max_length tokens anyway;
#: cutting first keeps a huge prompt from costing a huge tokenisation).
MAX_CHARS = 2000


class VerifierError(RuntimeError):
    """A verification call failed, or the verifier is closed (the proxy fails safe: no semantic hit)."""


class VerifierUnavailable(VerifierError):
    """The verifier cannot be loaded (missing or foreign files)."""


@dataclass(frozen=True, slots=True)
class VerifyRule:
    """Which hits are verified, and the score a served hit needs."""

    cosine_floor: float
    """Hits below this cosine similarity are never candidates (and never cost a verifier call)."""
    top_k: int
    """At most this many of the best hits above the floor are verified, in one batched call."""
    threshold: float
    """Serve the best-scored candidate when its verifier score reaches this."""

    def candidates(self, similarities: Sequence[float]) -> list[int]:
        """Indices (best first) of the hits worth verifying."""
        return [i for i, s in enumerate(similarities) if s >= self.cosine_floor][: self.top_k]

    head: tuple[float, float, float] = (1.0, 0.0, 0.0)
    """Output head recalibrated on judged live traffic (``policy.retrain_verifier``): the served score is
    sigmoid(a * logit(score) + b * cosine + c); (1, 0, 0) leaves the verifier's score as it is."""

    def adjusted(self, score: float, similarity: float) -> float:
        """The score after the head (the identity head returns ``score`` itself)."""
        return head_score(self.head, score, similarity)

    def choose(self, indices: Sequence[int], scores: Sequence[float]) -> int | None:
        """The hit to serve among verified ``indices`` with ``scores``, or None (forward)."""
        if not len(indices):
            return None
        best = int(np.argmax(np.asarray(scores, dtype=np.float64)))
        return int(indices[best]) if float(scores[best]) >= self.threshold else None


IDENTITY_HEAD = (1.0, 0.0, 0.0)


def recalibration_applies(record: dict[str, Any], verifier: "PairVerifier") -> bool:
    """Whether a published recalibration was fitted for this verifier with the embedder it serves with:
    its head reads cosines and its floor is one, and each embedder has its own scale."""
    return record.get("verifier_id") == verifier.id and record.get("embedder_id") == verifier.embedder_id


def head_score(head: Sequence[float], score: Any, similarity: Any) -> Any:
    """sigmoid(a * logit(score) + b * similarity + c), elementwise on floats or arrays."""
    a, b, c = (float(x) for x in head)
    if (a, b, c) == IDENTITY_HEAD:
        return score
    p = np.clip(np.asarray(score, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = a * np.log(p / (1 - p)) + b * np.asarray(similarity, dtype=np.float64) + c
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if out.ndim == 0 else out


def threshold_for(calibration: dict[str, Any], max_false_hit_rate: float) -> float:
    """The score threshold calibrated for the largest tabulated delta not above the operator's bound
    (a bound between two calibrated deltas takes the stricter one; below all of them: never serve).
    ``calibration``: ``{"thresholds": {"0.02": 0.93, ...}, ...}``."""
    from velo_proxy.calibration import threshold_for_bound

    return threshold_for_bound(calibration.get("thresholds", {}), max_false_hit_rate, none=float("inf"))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS]


class PairVerifier:
    """The exported cross-encoder on onnxruntime. ``score_sync(query, candidates)`` -> float32 [n].

    ``score`` (the request path) puts the pairs of concurrent callers together into batches of up to
    ``batch_max`` pairs, one onnxruntime call each, waiting at most ``batch_wait_ms`` for company;
    ``score_sync``, ``score_pairs`` and ``score_many`` (offline, blocking) run at once on the caller's
    thread and never start the batcher. ``embedder_id``: the serving embedder, whose calibration block
    is used when the model carries several (``calibrations``)."""

    def __init__(self, model_dir: Path, *, threads: int = 1, batch_max: int = 3, batch_wait_ms: float = 0.0,
                 embedder_id: str | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser()
        missing = [n for n in (MODEL_FILE, TOKENIZER_FILE, METADATA_FILE) if not (self.model_dir / n).is_file()]
        if missing:
            where = "does not exist" if not self.model_dir.is_dir() else f"lacks {', '.join(missing)}"
            raise VerifierUnavailable(f"verifier directory {self.model_dir} {where}; {EXPORT_HINT}.")
        try:
            self.metadata: dict[str, Any] = json.loads((self.model_dir / METADATA_FILE).read_text(encoding="utf-8"))
            import onnxruntime as ort
            from tokenizers import Tokenizer

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, int(threads))
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(self.model_dir / MODEL_FILE), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
            self._tokenizer = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILE))
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign files: same remedy
            raise VerifierUnavailable(f"cannot load the verifier from {self.model_dir}: {exc}; {EXPORT_HINT}.") from exc
        self.id = str(self.metadata.get("id", self.model_dir.name))
        self.max_length = int(self.metadata.get("max_length", 128))
        self.embedder_id: str | None = self.metadata.get("embedder_id")
        self.calibration: dict[str, Any] = self.metadata.get("calibration") or {}
        # One model can be calibrated with several embedders (``calibrations``: {embedder id: block}, the
        # primary first, which is also ``calibration``): the cosine floor and the thresholds hold only for
        # the similarities they were measured with, so the serving embedder picks its block.
        calibrations: dict[str, dict[str, Any]] = self.metadata.get("calibrations") or {}
        if embedder_id is not None and calibrations:
            block = calibrations.get(embedder_id)
            # no block for this embedder: report every embedder it has one for (the proxy refuses it)
            self.embedder_id = embedder_id if block is not None else ", ".join(calibrations)
            self.calibration = block or {}
        self._tokenizer.no_padding()
        # BERT's [PAD] is 0; the multilingual verifier's (XLM-R vocabulary) names its own
        self._tokenizer.enable_padding(pad_id=int(self.metadata.get("pad_id", 0)),
                                       pad_token=str(self.metadata.get("pad_token", "[PAD]")))
        self._tokenizer.enable_truncation(max_length=self.max_length, strategy="longest_first")
        self._inputs = [i.name for i in self._session.get_inputs()]
        self.calls = 0  # onnxruntime calls
        self.pairs_scored = 0
        self.batcher: MicroBatcher[tuple[str, str]] = MicroBatcher(
            self._score_batch, max_items=batch_max, wait_s=max(0.0, float(batch_wait_ms)) / 1000.0,
            name="verifier", error=VerifierError)
        self._closed = False

    def rule(self, max_false_hit_rate: float, recalibration: dict[str, Any] | None = None) -> VerifyRule:
        """The serving rule calibrated for the operator's bound: the model's own calibration, or a
        ``recalibration`` the retrain job published for this verifier (its head and thresholds)."""
        calibration = recalibration if recalibration is not None else self.calibration
        return VerifyRule(cosine_floor=float(calibration.get("cosine_floor", 0.75)),
                          top_k=int(calibration.get("top_k", 3)),
                          threshold=threshold_for(calibration, max_false_hit_rate),
                          head=tuple(float(x) for x in calibration.get("head", IDENTITY_HEAD)))

    def encode(self, queries: Sequence[str], candidates: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for the pairs (queries[i], candidates[i]) (batch-padded, truncated)."""
        encs = self._tokenizer.encode_batch([(_cut(q), _cut(c)) for q, c in zip(queries, candidates)])
        feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        return {k: v for k, v in feeds.items() if k in self._inputs}

    def score_pairs(self, queries: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Blocking: scores of (queries[i], candidates[i]), float32 [n]."""
        if len(queries) != len(candidates):
            raise ValueError("queries and candidates differ in length")
        if not len(queries):
            return np.zeros(0, dtype=np.float32)
        (out,) = self._session.run(["score"], self.encode(queries, candidates))
        self.calls += 1
        self.pairs_scored += len(queries)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def score_sync(self, query: str, candidates: Sequence[str]) -> np.ndarray:
        return self.score_pairs([query] * len(candidates), list(candidates))

    def score_many(self, queries: Sequence[str], candidates: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Blocking bulk scoring for offline jobs (length-sorted batches pad little)."""
        n = len(queries)
        out = np.empty(n, dtype=np.float32)
        order = sorted(range(n), key=lambda i: len(queries[i]) + len(candidates[i]))
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.score_pairs([queries[i] for i in idx], [candidates[i] for i in idx])
        return out

    def _score_batch(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return self.score_pairs([q for q, _ in pairs], [c for _, c in pairs])

    async def score(self, query: str, candidates: Sequence[str]) -> np.ndarray:
        """Scores of (query, candidate) for each candidate, float32 [n], on the worker thread: one
        onnxruntime call for these pairs and those of the concurrent callers batched with them (the
        model reads each pair through its attention mask, so its score does not depend on its company).
        Raises ``VerifierError`` when the batch fails or the verifier is closed."""
        if self._closed:
            raise VerifierError("verifier closed")
        pairs = [(query, c) for c in candidates]
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        return await self.batcher.submit(pairs)

    def close(self) -> None:
        """Stop the batcher (callers still waiting get ``VerifierError``) and release its thread; ``score``
        raises from now on. The blocking methods keep working (offline users never start the batcher)."""
        self._closed = True
        self.batcher.close()
