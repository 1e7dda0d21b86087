"""The multilingual pair verifier's export (velo_proxy/e5_verifier_export.py, issue #16).

The export is built from weights that stand in for a fine-tune (the base's upper layers perturbed,
a random head, saved as the training run saves them: float16 safetensors), so the check does not
depend on which weights the package ships. Checked: the directory loads with PairVerifier (no
token_type_ids, e5's pad id) and its scores match the torch cross-encoder that training uses, batched
and alone (torch vs onnxruntime parity); the overrides do reach the graph (a graph built without them
scores differently); the int8 export stays close to fp32; the numpy reference agrees; a weights file
with a tensor the graph does not know is refused; the export is idempotent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

try:
    import torch
except ImportError:  # a missing install step fails, it is never skipped
    pytest.fail("torch is not installed: `make install-dev` (the 'train' extra)", pytrace=False)

from velo_proxy import e5_verifier_export as X  # noqa: E402
from velo_proxy.model_export import ExportError  # noqa: E402
from velo_proxy.verifier import METADATA_FILE, PairVerifier  # noqa: E402

PAIRS = X.PARITY_PAIRS + [
    ("Is it safe to drink alcohol after taking ibuprofen?", "Can I take ibuprofen without alcohol?"),
    (" ".join(["Le proxy met en cache des réponses aux questions qui veulent dire la même chose."] * 20), "court"),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, _ = X.build_torch_cross_encoder()
    trained = {}
    for name, p in model.named_parameters():
        if name.startswith("head.") or any(name.startswith(f"bert.encoder.layer.{i}.") for i in range(8, 12)):
            with torch.no_grad():
                if not name.startswith("head."):
                    p.add_(0.02 * torch.randn_like(p))
                else:
                    p.mul_(40.0)  # spread the scores over [0, 1]
            trained[name] = p.detach().half().contiguous()
    path = tmp_path_factory.mktemp("w") / "e5-verifier.safetensors"
    save_file(trained, str(path))
    return path


@pytest.fixture(scope="module")
def card() -> dict:
    return {"id": "test-e5-verifier", "config": {"max_length": 128},
            "calibration": {"fp32": {"embedder_id": "intfloat/multilingual-e5-small-q4", "cosine_floor": 0.9,
                                     "top_k": 3, "thresholds": {"0.1": 0.9}},
                            "int8": {"embedder_id": "intfloat/multilingual-e5-small-q4", "thresholds": {}}}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights, card) -> Path:
    return X.build_dir(tmp_path_factory.mktemp("m") / "e5-pair-verifier", weights=weights, card=card,
                       precision="fp32")


def torch_scores(weights: Path, verifier: PairVerifier, pairs) -> np.ndarray:
    model, _ = X.build_torch_cross_encoder(weights=weights)
    feeds = verifier.encode([a for a, _ in pairs], [b for _, b in pairs])
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


def test_the_export_loads_as_a_pair_verifier_and_matches_torch(exported, weights):
    verifier = PairVerifier(exported)
    meta = json.loads((exported / METADATA_FILE).read_text())
    assert verifier.embedder_id == "intfloat/multilingual-e5-small-q4"
    assert meta["pad_id"] == 1 and meta["pad_token"] == "<pad>"
    assert verifier.rule(0.1).threshold == pytest.approx(0.9) and verifier.rule(0.1).cosine_floor == 0.9
    feeds = verifier.encode([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert set(feeds) == {"input_ids", "attention_mask"}  # XLM-R has no token types
    assert feeds["input_ids"].shape[1] <= 128
    assert (feeds["input_ids"][feeds["attention_mask"] == 0] == 1).all()  # padded with e5's <pad>
    batch = verifier.score_pairs([a for a, _ in PAIRS], [b for _, b in PAIRS])
    alone = np.array([verifier.score_pairs([a], [b])[0] for a, b in PAIRS])
    ref = torch_scores(weights, verifier, PAIRS)
    assert np.abs(batch - ref).max() < 1e-4
    assert np.abs(alone - ref).max() < 1e-4
    assert batch.std() > 0.05  # the pairs get different scores: the check is not comparing constants
    assert meta["parity_fp32_max_abs_diff"] < X.PARITY_TOLERANCE


def test_the_trained_layers_reach_the_graph(exported, weights, tmp_path):
    """The same head on the base's own layers gives other scores: the overrides are in the graph."""
    import onnx

    from velo_proxy.e5_export import build_onnx, read_source

    overrides, head = X.onnx_tensors(X.read_weights(weights))
    src = read_source()
    base_only = tmp_path / "v"
    base_only.mkdir()
    for name in ("tokenizer.json", METADATA_FILE):
        (base_only / name).write_bytes((exported / name).read_bytes())
    onnx.save(build_onnx(src, head=head), str(base_only / "model.onnx"))
    a = PairVerifier(exported).score_pairs([p for p, _ in PAIRS], [q for _, q in PAIRS])
    b = PairVerifier(base_only).score_pairs([p for p, _ in PAIRS], [q for _, q in PAIRS])
    assert np.abs(a - b).max() > 1e-3


def test_int8_stays_close_and_export_is_idempotent(tmp_path, weights, card, exported):
    out = X.build_dir(tmp_path / "int8", weights=weights, card=card, precision="int8")
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["precision"] == "int8" and meta["int8_vs_fp32_max_abs_diff"] <= X.INT8_TOLERANCE
    assert meta["calibration"] == card["calibration"]["int8"]  # each precision carries its own calibration
    stamp = (out / "model.onnx").stat().st_mtime_ns
    assert X.build_dir(tmp_path / "int8", weights=weights, card=card, precision="int8") == out
    assert (out / "model.onnx").stat().st_mtime_ns == stamp
    fp32 = PairVerifier(exported).score_pairs([a for a, _ in PAIRS], [b for _, b in PAIRS])
    int8 = PairVerifier(out).score_pairs([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert 0 < np.abs(fp32 - int8).max() <= X.INT8_TOLERANCE  # quantised, not broken
    # the same function, coarser (0.76 on these random-perturbation weights; on the shipped weights the
    # card measures what int8 costs on held-out pairs)
    assert np.corrcoef(fp32, int8)[0, 1] > 0.5


def test_unknown_tensors_and_a_missing_head_are_refused(weights):
    state = X.read_weights(weights)
    with pytest.raises(ExportError, match="does not know"):
        X.onnx_tensors({**state, "bert.embeddings.word.weight": np.zeros((2, 2))})
    with pytest.raises(ExportError, match="head"):
        X.onnx_tensors({k: v for k, v in state.items() if not k.startswith("head.")})


def test_one_model_carries_a_calibration_per_embedder(tmp_path, weights, card):
    """The cosine floor and thresholds hold only for the similarities they were measured with: the serving
    embedder picks its block, an embedder without one gets none (and the proxy refuses the verifier), and a
    recalibrated card re-exports."""
    blocks = {"emb-minilm": {"cosine_floor": 0.75, "top_k": 3, "thresholds": {"0.1": 0.8}},
              "emb-e5": {"cosine_floor": 0.88, "top_k": 3, "thresholds": {"0.05": 0.97, "0.1": 0.95}}}
    two = {**card, "calibration": {"fp32": blocks}}
    out = X.build_dir(tmp_path / "v", weights=weights, card=two, precision="fp32")
    assert X.calibration_blocks(two, "fp32") == {k: {**v, "embedder_id": k} for k, v in blocks.items()}
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["embedder_id"] == "emb-minilm" and list(meta["calibrations"]) == ["emb-minilm", "emb-e5"]
    primary = PairVerifier(out)
    assert primary.embedder_id == "emb-minilm" and primary.rule(0.1).threshold == pytest.approx(0.8)
    e5 = PairVerifier(out, embedder_id="emb-e5")
    assert e5.embedder_id == "emb-e5"
    rule = e5.rule(0.05)
    assert (rule.cosine_floor, rule.threshold) == (0.88, pytest.approx(0.97))
    other = PairVerifier(out, embedder_id="emb-other")
    assert other.embedder_id == "emb-minilm, emb-e5" and other.calibration == {}
    assert other.rule(0.1).threshold == float("inf")  # never serve
    stamp = (out / "model.onnx").stat().st_mtime_ns
    blocks["emb-e5"]["thresholds"]["0.1"] = 0.96
    X.build_dir(tmp_path / "v", weights=weights, card=two, precision="fp32")
    assert (out / "model.onnx").stat().st_mtime_ns != stamp
    assert PairVerifier(out, embedder_id="emb-e5").rule(0.1).threshold == pytest.approx(0.96)


def test_the_shipped_multilingual_verifier_serves_beside_e5_and_no_near_miss(make_proxy, tmp_path, monkeypatch,
                                                                           english_verifier_dir):
    """`velo-proxy models export --embedder multilingual-e5-small` exports the e5 embedder and, beside it, the
    shipped multilingual verifier, calibrated for both embedders; VELO_EMBEDDER alone selects the pair. At the
    loosest bound its e5 calibration supports, the hand-written near misses (tests/data/near_misses.jsonl)
    are all forwarded and some paraphrases are served, through the real proxy."""
    import httpx

    from tests.test_cache import ADMIN
    from tests.test_near_misses import run_pairs
    from velo_proxy.cli import main
    from velo_proxy.settings import Settings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert main(["models", "export", "--embedder", "multilingual-e5-small"]) == 0
    models = tmp_path / "xdg" / "velo-proxy" / "models"
    assert Settings(embedder="multilingual-e5-small").verifier_dir == models / "e5-pair-verifier"
    meta = json.loads((models / "e5-pair-verifier" / METADATA_FILE).read_text())
    e5_id = json.loads((models / "multilingual-e5-small" / "velo_embedder.json").read_text())["id"]
    assert list(meta["calibrations"]) == ["sentence-transformers/all-MiniLM-L6-v2",
                                          "sentence-transformers/all-MiniLM-L6-v2-int8", e5_id]
    assert not (models / "pair-verifier").exists()  # beside e5 only the verifier that can serve it
    assert meta["calibrations"][e5_id]["cosine_floor"] > 0.85  # e5's compressed scale, not MiniLM's 0.75
    delta = max(float(d) for d in meta["calibrations"][e5_id]["thresholds"])
    server = make_proxy(embedder="multilingual-e5-small", policy="verified", max_false_hit_rate=delta,
                        admin_key=ADMIN)
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["checks"]["verifier"]["ok"], ready
    results = run_pairs(server)
    served = [(p["kind"], p["asked"], v) for p, action, v in results["near"] if action == "A"]
    assert not served, f"near misses served from the cache: {served}"
    same = [p["asked"] for p, action, _ in results["same"] if action == "A"]
    assert len(same) >= 2, f"only {len(same)} paraphrases served: {same}"
    # the English verifier has no calibration for e5's similarities: the proxy refuses it and says why
    english = make_proxy(embedder="multilingual-e5-small", verifier_dir=english_verifier_dir, policy="verified",
                         admin_key=ADMIN)
    check = httpx.get(f"{english.url}/readyz").json()["checks"]["verifier"]
    assert not check["ok"] and "all-MiniLM-L6-v2" in check["detail"] and e5_id in check["detail"], check


def test_the_verifier_follows_the_policy_unless_named(monkeypatch, tmp_path):
    """VELO_VERIFIER defaults to the multilingual verifier (calibrated for every embedder, the only one whose
    calibration holds a bound), with the learned policy too, which was trained on its scores; naming one, or
    its directory, wins."""
    from velo_proxy.settings import Settings

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    models = tmp_path / "velo-proxy" / "models"
    assert (Settings().verifier, Settings().verifier_dir) == ("e5-pair-verifier", models / "e5-pair-verifier")
    learned = Settings(policy="learned")
    assert (learned.verifier, learned.verifier_dir) == ("e5-pair-verifier", models / "e5-pair-verifier")
    assert Settings(policy="learned", verifier="pair-verifier").verifier_dir == models / "pair-verifier"
    e5 = Settings(embedder="multilingual-e5-small")
    assert (e5.verifier, e5.verifier_dir) == ("e5-pair-verifier", models / "e5-pair-verifier")
    assert Settings(verifier="e5-pair-verifier").verifier_dir == models / "e5-pair-verifier"
    monkeypatch.setenv("VELO_VERIFIER_DIR", str(tmp_path / "mine"))
    assert Settings(embedder="multilingual-e5-small").verifier_dir == tmp_path / "mine"
