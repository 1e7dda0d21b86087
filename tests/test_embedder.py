"""Embedder: ONNX parity with sentence-transformers, padding, micro-batching, cancellation,
the remote /v1/embeddings client, and the export's directory handling.

The model is read from ``Settings().embedder_dir`` (written by ``velo-proxy models export`` during
installation). A missing model fails these tests; it never skips them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from velo_proxy import model_export
from velo_proxy.embedder import (
    EmbedderError,
    EmbedderUnavailable,
    OnnxEmbedder,
    RemoteEmbedder,
    build_embedder,
)
from velo_proxy.settings import Settings

TOL = 1e-5

SENTENCES = [
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "What is the capital of France?",
    "Wie kann ich mein Passwort zurücksetzen?",
    "Wo ist der nächste Bahnhof?",
    "¿Cuál es la mejor manera de aprender Python?",
    "Quelle est la capitale de la France ?",
    "如何提高睡眠质量？",
    "北京今天的天气怎么样",
    "ok",
    # Far past 256 tokens: both sides must truncate at the model's max_seq_length.
    " ".join(["A semantic cache answers repeated questions without calling the model."] * 40),
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = Settings().embedder_dir
    if not ((path / "model.onnx").is_file() and (path / "tokenizer.json").is_file()):
        pytest.fail(
            f"no exported embedder at {path}: run `velo-proxy models export` "
            "(the README install step) before the tests"
        )
    return path


@pytest.fixture(scope="module")
def onnx_embedder(model_dir: Path) -> OnnxEmbedder:
    return OnnxEmbedder(model_dir, threads=1, max_batch=32, batch_wait_ms=2.0)


@pytest.fixture
async def embedder(onnx_embedder: OnnxEmbedder):
    await onnx_embedder.start()
    try:
        yield onnx_embedder
    finally:
        await onnx_embedder.aclose()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_export.source_model_dir()), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES), show_progress_bar=False)


def _unit_rows(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# --- parity and tokenization ---------------------------------------------------------------------


async def test_parity_with_sentence_transformers(embedder: OnnxEmbedder, reference: np.ndarray) -> None:
    assert embedder.dim == 384 and reference.shape == (len(SENTENCES), 384)
    bulk = embedder.embed_sync(SENTENCES, batch_size=4)  # length-sorted, several batches
    one_batch = await embedder.embed(SENTENCES)
    singles = np.concatenate([await embedder.embed([s]) for s in SENTENCES])
    for got in (bulk, one_batch, singles):
        assert got.shape == reference.shape
        _unit_rows(got)
        diff = float(np.abs(got - reference).max())
        assert diff <= TOL, f"max abs diff vs sentence-transformers {diff:.2e}"
    # Paraphrases are closer than unrelated questions (guards against a degenerate model).
    sims = one_batch @ one_batch.T
    assert sims[0, 1] > 0.6 > sims[0, 2]


def test_a_query_prefix_in_the_metadata_is_put_before_every_text(model_dir: Path, onnx_embedder: OnnxEmbedder,
                                                                   tmp_path: Path) -> None:
    """e5-style models need a role prefix ("query: "): an export that names one in velo_embedder.json gets it
    added to every text embedded, online and offline; MiniLM's export names none."""
    import shutil

    prefixed = tmp_path / "prefixed"
    shutil.copytree(model_dir, prefixed)
    meta = json.loads((prefixed / "velo_embedder.json").read_text())
    (prefixed / "velo_embedder.json").write_text(json.dumps({**meta, "query_prefix": "query: "}))
    embedder = OnnxEmbedder(prefixed, threads=1)
    assert onnx_embedder.query_prefix == "" and embedder.query_prefix == "query: "
    manual = onnx_embedder.embed_sync([f"query: {s}" for s in SENTENCES])
    np.testing.assert_allclose(embedder.embed_sync(SENTENCES), manual, atol=1e-6)
    assert float(np.abs(onnx_embedder.embed_sync(SENTENCES) - manual).max()) > 1e-3  # the prefix matters


def test_metadata_and_identity(model_dir: Path, onnx_embedder: OnnxEmbedder) -> None:
    meta = json.loads((model_dir / "velo_embedder.json").read_text())
    src_sha = model_export.sha256_file(model_export.source_model_dir() / "model.safetensors")
    assert meta == {
        "id": "sentence-transformers/all-MiniLM-L6-v2",
        "dim": 384,
        "max_length": 256,
        "source_sha256": src_sha,
        "format": 1,
    }
    assert onnx_embedder.id == meta["id"] and onnx_embedder.dim == 384 and onnx_embedder.max_length == 256
    assert model_export.is_complete(model_dir, src_sha)

    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["sentence_embedding"]
    for inp in graph.input:  # dynamic batch and sequence axes
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 384


def test_short_query_is_not_padded(model_dir: Path, onnx_embedder: OnnxEmbedder) -> None:
    from tokenizers import Tokenizer

    # The file on disk has no fixed padding (the shipped one pads everything to 128).
    on_disk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert len(on_disk.encode("hello world").ids) == 4  # [CLS] hello world [SEP]
    assert on_disk.truncation["max_length"] == 256
    ids, mask = onnx_embedder.tokenize(["hello world"])
    assert ids.shape == (1, 4) and mask.tolist() == [[1, 1, 1, 1]]
    # A batch is padded to its longest member only; long inputs are cut at 256.
    ids, mask = onnx_embedder.tokenize(["hi", "how are you today", SENTENCES[-1]])
    assert ids.shape == (3, 256)
    assert mask.sum(axis=1).tolist()[:2] == [3, 6]
    ids, _ = onnx_embedder.tokenize(["hi", "how are you today"])
    assert ids.shape == (2, 6)


def test_mixed_lengths_run_in_length_groups(onnx_embedder: OnnxEmbedder) -> None:
    from velo_proxy.embedder import _length_groups

    lengths = np.array([60, 3, 21, 4, 5, 20, 6, 256, 5])
    groups = _length_groups(lengths, 16.0)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # each text once
    assert [lengths[g].tolist() for g in groups] == [[3, 4, 5, 5, 6], [20, 21], [60], [256]]
    assert len(_length_groups(np.array([7, 7, 7]), 16.0)) == 1
    # A batch of short questions and one long text gives the same vectors as one text at a time.
    texts = ["hi", "what is a cache?", SENTENCES[-1], "ok", "Wie spät ist es?"]
    together = onnx_embedder.embed_sync(texts, batch_size=len(texts))
    alone = np.concatenate([onnx_embedder.embed_sync([t]) for t in texts])
    assert float(np.abs(together - alone).max()) <= TOL


def test_empty_and_bad_input(onnx_embedder: OnnxEmbedder) -> None:
    assert onnx_embedder.embed_sync([]).shape == (0, 384)
    with pytest.raises(TypeError):
        onnx_embedder.embed_sync("not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        onnx_embedder.embed_sync([b"bytes"])  # type: ignore[list-item]


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys, velo_proxy.embedder, velo_proxy.model_export\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- micro-batching ------------------------------------------------------------------------------


def _questions(n: int) -> list[str]:
    topics = ["password", "invoice", "weather in Paris", "python lists", "train to Berlin", "刷新缓存"]
    return [f"Question {i}: what should I know about {topics[i % len(topics)]}{'?' * (i % 4)}" for i in range(n)]


async def test_concurrent_calls_are_batched_and_match_sequential(embedder: OnnxEmbedder) -> None:
    texts = _questions(50)
    before = embedder.batches_run
    sequential = np.concatenate([await embedder.embed([t]) for t in texts])
    assert embedder.batches_run - before == 50  # one at a time: one batch each

    before = embedder.batches_run
    results = await asyncio.gather(*(embedder.embed([t]) for t in texts))
    batches = embedder.batches_run - before
    assert 2 <= batches <= 5, batches  # 50 texts, max_batch 32: two batches, a few at worst
    concurrent = np.concatenate(results)
    assert concurrent.shape == (50, 384)
    assert float(np.abs(concurrent - sequential).max()) <= TOL
    # Each caller got its own row, not a neighbour's.
    assert np.argmax(concurrent @ sequential.T, axis=1).tolist() == list(range(50))


async def test_multi_text_calls_keep_their_rows(embedder: OnnxEmbedder) -> None:
    texts = _questions(12)
    expected = embedder.embed_sync(texts)
    parts = await asyncio.gather(embedder.embed(texts[:5]), embedder.embed(texts[5:6]), embedder.embed(texts[6:]))
    assert [p.shape[0] for p in parts] == [5, 1, 6]
    assert float(np.abs(np.concatenate(parts) - expected).max()) <= TOL


async def test_cancelled_and_timed_out_callers_do_not_break_the_batcher(embedder: OnnxEmbedder) -> None:
    texts = _questions(6)
    expected = embedder.embed_sync(texts)
    long_text = SENTENCES[-1]

    # Keep the worker busy so that the next callers wait in the queue.
    busy = asyncio.create_task(embedder.embed([long_text] * 8))
    await asyncio.sleep(0.005)
    tasks = [asyncio.create_task(embedder.embed([t])) for t in texts]
    await asyncio.sleep(0)  # let them enqueue
    tasks[1].cancel()
    tasks[4].cancel()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(embedder.embed([texts[2]]), timeout=0.001)
    skipped_before = embedder.cancelled_skipped
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError) and isinstance(done[4], asyncio.CancelledError)
    for i in (0, 2, 3, 5):
        assert float(np.abs(done[i][0] - expected[i]).max()) <= TOL
    assert (await busy).shape == (8, 384)
    assert embedder.cancelled_skipped - skipped_before >= 3  # two cancelled + one timed out

    # A caller cancelled while its batch is already running in the worker thread.
    running = asyncio.create_task(embedder.embed([long_text] * 4))
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    # Later calls still work and give the right vectors.
    after = await asyncio.wait_for(embedder.embed(texts), timeout=10)
    assert float(np.abs(after - expected).max()) <= TOL
    assert embedder.batcher.running


async def test_restart_and_close(model_dir: Path) -> None:
    emb = OnnxEmbedder(model_dir)
    first = await emb.embed(["auto-started"])  # embed starts the batcher when needed
    await emb.aclose()
    await emb.aclose()  # idempotent
    async with emb:
        again = await emb.embed(["auto-started"])
    assert float(np.abs(first - again).max()) == 0.0


# --- remote --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def embeddings_server(onnx_embedder: OnnxEmbedder):
    """A tiny OpenAI-compatible /v1/embeddings server backed by the ONNX embedder.

    It answers rows in reverse order and not normalised, as some servers do."""
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException

    app = FastAPI()
    seen: list[dict] = []

    @app.post("/v1/embeddings")
    def embeddings(body: dict, authorization: str | None = Header(None)) -> dict:
        if authorization != "Bearer sekret":
            raise HTTPException(401, "bad key")
        seen.append(body)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = onnx_embedder.embed_sync(texts) * 3.0
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "model": body["model"], "data": data[::-1], "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test embeddings server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def test_remote_embedder_matches_local(embeddings_server, onnx_embedder: OnnxEmbedder) -> None:
    base_url, seen = embeddings_server
    texts = SENTENCES[:6]
    expected = onnx_embedder.embed_sync(texts)
    remote = RemoteEmbedder(base_url, model="all-MiniLM-L6-v2", api_key="sekret", timeout_s=10)
    assert remote.dim == 0
    await remote.start()
    try:
        assert remote.dim == 384  # learned from the probe
        got = await remote.embed(texts)
        _unit_rows(got)
        assert float(np.abs(got - expected).max()) <= TOL
        assert seen[-1]["model"] == "all-MiniLM-L6-v2" and seen[-1]["input"] == texts
        got_sync = remote.embed_sync(texts, batch_size=4)  # two requests
        assert float(np.abs(got_sync - expected).max()) <= TOL
        assert [len(b["input"]) for b in seen[-2:]] == [4, 2]
    finally:
        await remote.aclose()

    bad = RemoteEmbedder(base_url, model="all-MiniLM-L6-v2", api_key="wrong", dim=384)
    await bad.start()
    try:
        with pytest.raises(EmbedderError, match="401"):
            await bad.embed(["hello"])
    finally:
        await bad.aclose()


async def test_remote_embedder_unreachable() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    probing = RemoteEmbedder(url, model="m", timeout_s=2)
    with pytest.raises(EmbedderUnavailable, match="dimension probe"):
        await probing.start()  # no dim, no answer: unusable, and says so at startup
    assert probing._client is None
    known = RemoteEmbedder(url, model="m", timeout_s=2, dim=384)
    await known.start()  # dim given: no probe, starts
    try:
        with pytest.raises(EmbedderError, match="unreachable"):
            await known.embed(["hello"])
    finally:
        await known.aclose()


def test_build_embedder_follows_settings(model_dir: Path, tmp_path: Path) -> None:
    remote = build_embedder(Settings(embedder_url="http://embed:9000/v1/", embedder_model="bge", embedder_api_key="k"))
    assert isinstance(remote, RemoteEmbedder)
    assert remote.url == "http://embed:9000/v1/embeddings" and remote.id == "bge"
    assert remote._headers == {"Authorization": "Bearer k"}
    local = build_embedder(Settings(embedder_dir=model_dir, embedder_threads=2, embed_batch_max=8, embed_batch_wait_ms=3))
    assert isinstance(local, OnnxEmbedder)
    assert (local.threads, local.max_batch, local.batch_wait_s) == (2, 8, 0.003)
    with pytest.raises(EmbedderUnavailable, match="velo-proxy models export"):
        build_embedder(Settings(embedder_dir=tmp_path / "absent"))


# --- missing and user-brought model directories ----------------------------------------------------


def test_missing_model_dir_raises_with_hint(tmp_path: Path) -> None:
    with pytest.raises(EmbedderUnavailable, match="velo-proxy models export") as exc:
        OnnxEmbedder(tmp_path / "nowhere")
    assert "does not exist" in str(exc.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(EmbedderUnavailable, match="lacks model.onnx.*velo-proxy models export"):
        OnnxEmbedder(tmp_path / "half")


def test_user_brought_model_dir(model_dir: Path, tmp_path: Path, reference: np.ndarray) -> None:
    """Only model.onnx + the stock tokenizer.json (fixed padding to 128, no metadata)."""
    mine = tmp_path / "my-minilm"
    mine.mkdir()
    os.symlink(model_dir / "model.onnx", mine / "model.onnx")
    shutil.copy(model_export.source_model_dir() / "tokenizer.json", mine / "tokenizer.json")
    emb = OnnxEmbedder(mine)
    assert emb.id == "my-minilm" and emb.dim == 384
    assert emb.tokenize(["hello world"])[0].shape == (1, 4)  # fixed padding overridden
    got = emb.embed_sync(SENTENCES[:-1])  # the stock tokenizer truncates at 128: skip the long one
    assert float(np.abs(got - reference[:-1]).max()) <= TOL


def test_model_with_last_hidden_state_is_pooled_here(model_dir: Path, tmp_path: Path, reference: np.ndarray) -> None:
    """A model that outputs token embeddings: mean pooling + normalisation in numpy."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"))
    last_ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"][-1]
    old_name = last_ln.output[0]
    last_ln.output[0] = "last_hidden_state"
    for node in model.graph.node:
        node.input[:] = ["last_hidden_state" if i == old_name else i for i in node.input]
    hidden = onnx.helper.make_tensor_value_info("last_hidden_state", onnx.TensorProto.FLOAT, ["batch", "sequence", 384])
    del model.graph.output[:]
    model.graph.output.append(hidden)
    mine = tmp_path / "token-model"
    mine.mkdir()
    onnx.save(model, str(mine / "model.onnx"))
    shutil.copy(model_dir / "tokenizer.json", mine / "tokenizer.json")

    emb = OnnxEmbedder(mine)
    assert emb._pool and emb.dim == 384 and emb.id == "token-model"
    got = emb.embed_sync(SENTENCES)
    _unit_rows(got)
    assert float(np.abs(got - reference).max()) <= TOL


# --- export directory handling (no torch run: the heavy steps are stubbed) --------------------------


def test_export_is_atomic_and_skips_complete_dirs(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "models" / "minilm"

    def interrupted(src: Path, path: Path) -> None:
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_export, "_export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model_export.export_embedder(out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half model, no temp dir

    calls: list[Path] = []

    def fake_export(src: Path, path: Path) -> None:
        calls.append(path)
        shutil.copy(model_dir / "model.onnx", path)

    monkeypatch.setattr(model_export, "_export_onnx", fake_export)
    monkeypatch.setattr(model_export, "check_parity", lambda *a, **k: 0.0)
    assert model_export.export_embedder(out) == out.resolve()
    assert model_export.is_complete(out) and len(calls) == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.json", "velo_embedder.json"]
    assert oct(out.stat().st_mode & 0o755) == oct(0o755 & ~_umask())
    model_export.export_embedder(out)  # complete: skipped
    assert len(calls) == 1
    (out / "stale").write_text("x")
    model_export.export_embedder(out, force=True)  # forced: rebuilt and swapped in
    assert len(calls) == 2 and not (out / "stale").exists() and model_export.is_complete(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["minilm"]

    def bad_parity(*a, **k):
        raise model_export.ExportError("max abs diff 1e-2")

    monkeypatch.setattr(model_export, "check_parity", bad_parity)
    with pytest.raises(model_export.ExportError):
        model_export.export_embedder(out, force=True)
    assert model_export.is_complete(out)  # the previous good export is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["minilm"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_int8_export_is_another_embedder_close_to_fp32(model_dir: Path, onnx_embedder: OnnxEmbedder,
                                                      int8_embedder_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`velo-proxy models export --embedder all-MiniLM-L6-v2-int8`: the same model with int8 weight matmuls.
    Its vectors are close to fp32's but not equal, so it carries its own id (stores, verifier calibrations and
    policies tell the two apart); a quantisation that moves a vector too far is refused and leaves nothing."""
    import onnx

    out = tmp_path / "int8"
    shutil.copytree(int8_embedder_dir, out)
    assert model_export.export_embedder(out, precision="int8") == out.resolve()  # complete: kept
    meta = json.loads((out / "velo_embedder.json").read_text())
    assert meta["id"] == model_export.EMBEDDER_ID_INT8 != onnx_embedder.id
    assert meta["precision"] == "int8" and meta["int8_min_cosine_to_fp32"] >= model_export.INT8_MIN_COSINE
    assert model_export.is_complete(out, precision="int8") and not model_export.is_complete(out)
    graph = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "MatMulInteger" for n in graph.graph.node)  # the weights really are int8
    assert {p.key: p.value for p in graph.metadata_props}["velo_embedder_id"] == model_export.EMBEDDER_ID_INT8
    int8 = OnnxEmbedder(out, threads=1)
    assert int8.id == model_export.EMBEDDER_ID_INT8 and int8.dim == onnx_embedder.dim
    texts = ["How do I convert a string to an integer in Python?", "flights from London to New York",
             "Can I take ibuprofen without alcohol?", "What is the capital of France?"]
    a, b = int8.embed_sync(texts), onnx_embedder.embed_sync(texts)
    _unit_rows(a)
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= model_export.INT8_MIN_COSINE and cosine.max() < 0.9999  # close, not the same vectors
    assert (out / "model.onnx").stat().st_size < 0.8 * (model_dir / "model.onnx").stat().st_size

    monkeypatch.setattr(model_export, "INT8_MIN_COSINE", 1.01)  # no quantisation can pass this
    with pytest.raises(model_export.ExportError, match="int8 embedder moves"):
        model_export.export_embedder(out, precision="int8", force=True)
    assert model_export.is_complete(out, precision="int8")  # the previous good export is untouched


def test_settings_name_the_int8_embedder_with_the_default_verifier(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = Settings(embedder="all-MiniLM-L6-v2-int8")
    assert settings.embedder_dir == tmp_path / "velo-proxy" / "models" / "all-MiniLM-L6-v2-int8"
    assert settings.embedder_dir.name == "all-MiniLM-L6-v2-int8"
    assert (settings.verifier, settings.verifier_dir.name) == ("e5-pair-verifier", "e5-pair-verifier")
