"""Sentence embedders for the request path: local ONNX (micro-batched) or a remote /v1/embeddings.

Every embedder returns float32 ``[n, dim]`` arrays with L2-normalised rows, so a dot product is the
cosine similarity. Runtime dependencies: numpy, onnxruntime, tokenizers, httpx; never torch.

``OnnxEmbedder`` serves concurrent ``embed`` calls through a ``velo_proxy.batching.MicroBatcher``:
one background task gathers them into micro-batches (up to ``max_batch`` texts, waiting at most
``batch_wait_ms`` for company) and runs them on one dedicated worker thread, so the event loop never
blocks on inference and two requests never fight over the CPU. Callers bound their own wait with
``asyncio.wait_for``; a caller that gives up is simply skipped.
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from velo_proxy.batching import MicroBatcher

log = logging.getLogger(__name__)

METADATA_FILE = "velo_embedder.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
EXPORT_HINT = "run `velo-proxy models export` to create it (or set VELO_EMBEDDER_DIR / VELO_EMBEDDER_URL)"
DEFAULT_MAX_LENGTH = 512
# Characters kept per model token before tokenizing. The tokenizer keeps only the first max_length
# tokens anyway, but it reads the whole text first: a 400 KB message cost ~0.4 s of tokenizing alone
# and overran the embedding deadline. A token spans far fewer characters than this (WordPiece turns a
# word longer than 100 characters into one [UNK]; English averages ~4.5 characters per token), so
# the first max_length tokens of the cut text are the same as those of the whole text and the vector
# does not change; only text of mostly whitespace or control characters is embedded from its prefix.
MAX_CHARS_PER_TOKEN = 100


class EmbedderError(RuntimeError):
    """An embedding call failed (the proxy fails open: the request goes upstream)."""


class EmbedderUnavailable(EmbedderError):
    """The embedder cannot be used at all (missing model files, unreadable model)."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero); float32, C-contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of strings, not a single string")
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"embed() takes strings, got {type(t).__name__}")
    return out


def _length_groups(lengths: np.ndarray, run_cost_tokens: float) -> list[np.ndarray]:
    """Split a batch into runs of similar length, cheapest first.

    Cost model: a run of ``k`` texts padded to ``w`` tokens costs ``run_cost_tokens + k * w``
    (the fixed part is reading all the weights once, which dominates small runs). Over the texts
    sorted by length, an O(n^2) dynamic programme finds the cheapest split into contiguous runs.
    """
    n = len(lengths)
    if n <= 1 or lengths.min() == lengths.max():
        return [np.arange(n)]
    order = np.argsort(lengths, kind="stable")
    srt = [int(x) for x in lengths[order]]
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = srt[j - 1]
        for i in range(j):
            cost = best[i] + run_cost_tokens + (j - i) * width
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds = []
    j = n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[i:j] for i, j in reversed(bounds)]


class Embedder(abc.ABC):
    """A sentence embedder: ``dim``-dimensional unit vectors for texts."""

    id: str
    dim: int

    async def start(self) -> None:
        """Acquire resources bound to the running event loop (background task, HTTP client)."""

    async def aclose(self) -> None:
        """Release what ``start`` acquired. Idempotent."""

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dim]``, L2-normalised rows, in the order of ``texts``."""

    @abc.abstractmethod
    def embed_sync(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Blocking bulk embedding for offline jobs; same result contract as ``embed``."""

    async def __aenter__(self) -> Embedder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- local ONNX --------------------------------------------------------------------------------


class OnnxEmbedder(Embedder):
    """An ONNX sentence embedder run with onnxruntime and a Hugging Face ``tokenizer.json``.

    ``model_dir`` holds ``model.onnx`` and ``tokenizer.json`` and, when written by
    ``velo-proxy models export``, ``velo_embedder.json`` (id, dim, max_length). Without metadata
    the id is the directory name and the dim is read from the model. A model whose output is
    ``last_hidden_state`` (``[batch, sequence, hidden]``) is mean-pooled over the attention mask
    here; every result is L2-normalised.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int = 1,
        max_batch: int = 32,
        batch_wait_ms: float = 1.0,
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self.threads = max(1, int(threads))
        self.batcher: MicroBatcher[str] = MicroBatcher(
            self._infer,
            max_items=max_batch,
            wait_s=max(0.0, float(batch_wait_ms)) / 1000.0,
            name="embedder",
            error=EmbedderError,
        )

        model_path = self.model_dir / MODEL_FILE
        tok_path = self.model_dir / TOKENIZER_FILE
        missing = [p.name for p in (model_path, tok_path) if not p.is_file()]
        if missing:
            where = "does not exist" if not self.model_dir.is_dir() else f"lacks {' and '.join(missing)}"
            raise EmbedderUnavailable(f"embedder model directory {self.model_dir} {where}; {EXPORT_HINT}.")

        meta = self._read_metadata()
        # e5-style models are trained with a role prefix ("query: "); the export's metadata names it
        self.query_prefix = str(meta.get("query_prefix") or "")
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            # Idle pool threads spinning for work doubled the CPU per query at threads=2 on a shared
            # 2-core box for no latency gain; the proxy's other work needs those cycles.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
            self._tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # corrupt or foreign files: same remedy
            raise EmbedderUnavailable(f"cannot load the embedder from {self.model_dir}: {exc}; {EXPORT_HINT}.") from exc

        self._setup_inputs()
        self._setup_output()
        self.max_length = int(meta.get("max_length") or self._tokenizer_max_length())
        self._setup_tokenizer()
        self.id = str(meta.get("id") or self.model_dir.resolve().name)
        dim = meta.get("dim") or self._output_dim
        if meta.get("dim") and self._output_dim and int(meta["dim"]) != self._output_dim:
            raise EmbedderUnavailable(
                f"{self.model_dir / METADATA_FILE} says dim {meta['dim']} but the model outputs "
                f"{self._output_dim}; {EXPORT_HINT}."
            )
        if not dim:
            dim = int(self._infer([""]).shape[1])
        self.dim = int(dim)

    # -- model plumbing --------------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, Any]:
        path = self.model_dir / METADATA_FILE
        if not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EmbedderUnavailable(f"unreadable {path}: {exc}; {EXPORT_HINT}.") from exc
        return meta if isinstance(meta, dict) else {}

    def _setup_inputs(self) -> None:
        dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
        self._inputs: dict[str, Any] = {}
        for inp in self._session.get_inputs():
            if inp.name not in ("input_ids", "attention_mask", "token_type_ids"):
                raise EmbedderUnavailable(
                    f"{self.model_dir / MODEL_FILE} has an unsupported input {inp.name!r}; "
                    "expected input_ids, attention_mask and optionally token_type_ids."
                )
            self._inputs[inp.name] = dtypes.get(inp.type, np.int64)
        if "input_ids" not in self._inputs:
            raise EmbedderUnavailable(f"{self.model_dir / MODEL_FILE} has no input_ids input.")

    def _setup_output(self) -> None:
        outputs = self._session.get_outputs()
        by_name = {o.name: o for o in outputs}
        chosen = None
        for name in ("sentence_embedding", "sentence_embeddings", "embeddings", "pooler_output"):
            if name in by_name and len(by_name[name].shape or ()) == 2:
                chosen = by_name[name]
                break
        if chosen is None:
            chosen = by_name.get("last_hidden_state") or by_name.get("token_embeddings")
        if chosen is None:
            rank2 = [o for o in outputs if len(o.shape or ()) == 2]
            rank3 = [o for o in outputs if len(o.shape or ()) == 3]
            chosen = (rank2 or rank3 or [None])[0]
        if chosen is None:
            raise EmbedderUnavailable(f"{self.model_dir / MODEL_FILE} has no [batch, dim] or [batch, seq, dim] output.")
        self._output_name = chosen.name
        self._pool = len(chosen.shape) == 3
        last = chosen.shape[-1]
        self._output_dim = last if isinstance(last, int) and last > 0 else None

    def _tokenizer_max_length(self) -> int:
        trunc = self._tokenizer.truncation
        return int(trunc["max_length"]) if trunc and trunc.get("max_length") else DEFAULT_MAX_LENGTH

    def _setup_tokenizer(self) -> None:
        # Never pad to a fixed length (the stock MiniLM tokenizer.json pads everything to 128, which
        # costs ~5x on a short query): pad a batch to its longest member only.
        pad = self._tokenizer.padding or {}
        pad_token = pad.get("pad_token") or "[PAD]"
        pad_id = pad.get("pad_id")
        if pad_id is None:
            pad_id = self._tokenizer.token_to_id(pad_token) or 0
        direction = "left" if str(pad.get("direction", "right")).lower() == "left" else "right"
        self._pad_left = direction == "left"
        self._tokenizer.no_padding()
        self._tokenizer.enable_padding(
            pad_id=pad_id, pad_token=pad_token, pad_type_id=pad.get("pad_type_id", 0), direction=direction
        )
        self._tokenizer.enable_truncation(max_length=self.max_length)

    def bounded(self, text: str) -> str:
        """``text`` cut to ``max_length * MAX_CHARS_PER_TOKEN`` characters (at a space when there is
        one near the cut), which holds more than the model's max_length tokens: what the tokenizer
        would keep of the whole text, at a bounded cost."""
        limit = self.max_length * MAX_CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        space = text.rfind(" ", limit - MAX_CHARS_PER_TOKEN, limit)
        return text[: space if space > 0 else limit]

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` as the model sees them (batch-padded, truncated)."""
        encs = self._tokenizer.encode_batch([self.query_prefix + self.bounded(t) for t in texts])
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask

    def _infer(self, texts: list[str]) -> np.ndarray:
        """Blocking: tokenize + run + (pool) + normalise. Thread-safe.

        Texts of very different lengths are not padded to the longest of them all: the batch is
        split into runs of similar length (``_length_groups``), which about doubles throughput on
        real questions at batch 32 for the cost of a few more, smaller, runs."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0) or 0), dtype=np.float32)
        ids, mask = self.tokenize(texts)
        lengths = mask.sum(axis=1)
        groups = _length_groups(lengths, self.RUN_COST_TOKENS)
        if len(groups) == 1:
            return self._run_model(ids, mask)
        out: np.ndarray | None = None
        for idx in groups:
            width = int(lengths[idx].max())
            cols = slice(ids.shape[1] - width, None) if self._pad_left else slice(0, width)
            vectors = self._run_model(ids[idx, cols], mask[idx, cols])
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[idx] = vectors
        assert out is not None
        return out

    # Fixed cost of one onnxruntime run, in padded tokens (measured here: a 1x4 run costs as
    # much as a 1x16 one; MiniLM reads ~40 MB of weights per run whatever its size).
    RUN_COST_TOKENS = 16.0

    def _run_model(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {}
        for name, dtype in self._inputs.items():
            if name == "input_ids":
                feeds[name] = np.ascontiguousarray(ids, dtype=dtype)
            elif name == "attention_mask":
                feeds[name] = np.ascontiguousarray(mask, dtype=dtype)
            else:
                feeds[name] = np.zeros(ids.shape, dtype=dtype)
        (out,) = self._session.run([self._output_name], feeds)
        out = np.asarray(out, dtype=np.float32)
        if self._pool:
            m = mask[:, :, None].astype(np.float32)
            out = (out * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return l2_normalize(out)

    # -- offline bulk --------------------------------------------------------------------------

    def embed_sync(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Length-sorted batches pad little; results go back to the callers' order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        step = max(1, int(batch_size))
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out[idx] = self._infer([texts[i] for i in idx])
        return out

    # -- micro-batched async path -----------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.batcher.max_items

    @property
    def batch_wait_s(self) -> float:
        return self.batcher.wait_s

    # Counters (read by tests, benchmarks and metrics).
    @property
    def batches_run(self) -> int:
        return self.batcher.batches_run

    @property
    def texts_embedded(self) -> int:
        return self.batcher.items_run

    @property
    def cancelled_skipped(self) -> int:
        return self.batcher.cancelled_skipped

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return await self.batcher.submit(texts)


# --- remote /v1/embeddings ---------------------------------------------------------------------


class RemoteEmbedder(Embedder):
    """An OpenAI-compatible embeddings endpoint: ``POST {base_url}/embeddings``."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        dim: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.id = model
        self.dim = int(dim) if dim else 0  # 0 until known: learned from start()'s probe or the first answer
        self.timeout_s = float(timeout_s)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/embeddings"

    async def start(self) -> None:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=self._headers)
        if not self.dim:
            # The store needs the dim up front: without an answer there is no usable embedder
            # (the proxy then serves without the semantic tier and says so).
            try:
                await self.embed(["dimension probe"])
            except Exception as exc:
                await self.aclose()
                raise EmbedderUnavailable(
                    f"remote embedder {self.url} did not answer the dimension probe: {exc}"
                ) from exc

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _payload(self, texts: list[str]) -> dict[str, Any]:
        return {"model": self.model, "input": texts, "encoding_format": "float"}

    def _parse(self, status: int, body: bytes, n: int) -> np.ndarray:
        if status != 200:
            raise EmbedderError(f"remote embedder {self.url} answered {status}: {body[:300]!r}")
        try:
            data = json.loads(body)["data"]
            rows = sorted(data, key=lambda d: d.get("index", 0))
            vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbedderError(f"remote embedder {self.url} sent an unexpected body: {exc}") from exc
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise EmbedderError(f"remote embedder {self.url} returned shape {vectors.shape} for {n} inputs")
        if not self.dim:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise EmbedderError(f"remote embedder {self.url} returned dim {vectors.shape[1]}, expected {self.dim}")
        return l2_normalize(vectors)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        import httpx

        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=self._headers)
        try:
            resp = await self._client.post(self.url, json=self._payload(texts))
        except httpx.HTTPError as exc:
            raise EmbedderError(f"remote embedder {self.url} unreachable: {exc!r}") from exc
        return self._parse(resp.status_code, resp.content, len(texts))

    def embed_sync(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        import httpx

        texts = _check_texts(texts)
        parts = []
        with httpx.Client(timeout=self.timeout_s, headers=self._headers) as client:
            for start in range(0, len(texts), max(1, int(batch_size))):
                chunk = texts[start : start + batch_size]
                try:
                    resp = client.post(self.url, json=self._payload(chunk))
                except httpx.HTTPError as exc:
                    raise EmbedderError(f"remote embedder {self.url} unreachable: {exc!r}") from exc
                parts.append(self._parse(resp.status_code, resp.content, len(chunk)))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts, axis=0)


def build_embedder(settings: Any) -> Embedder:
    """The embedder the settings ask for: remote when ``embedder_url`` is set, else local ONNX."""
    if getattr(settings, "embedder_url", None):
        key = settings.embedder_api_key
        if key is not None and hasattr(key, "get_secret_value"):
            key = key.get_secret_value()
        return RemoteEmbedder(
            settings.embedder_url,
            model=settings.embedder_model,
            api_key=key,
        )
    return OnnxEmbedder(
        settings.embedder_dir,
        threads=settings.embedder_threads,
        max_batch=settings.embed_batch_max,
        batch_wait_ms=settings.embed_batch_wait_ms,
    )
