"""Smoke test of the benchmarks (benchmarks/quality.py, benchmarks/latency.py, benchmarks/learning_loop.py): each
runs at a tiny size and its output keeps the structure docs/benchmarks.md is generated from, so the scripts do not rot.

Runs on the dataset slices in tests/data (conftest points VELO_DATASETS_DIR there) and needs the exported
embedder; the latency part also needs
``wrk`` (Debian package, installed by `make tools`). Whatever is missing fails the test with the reason.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
DATA = REPO / "tests" / "data"
sys.path.insert(0, str(BENCH))


def _need_data_and_embedder() -> None:
    import common

    assert common.require_data() == DATA, "the benchmarks read the datasets setting (VELO_DATASETS_DIR)"
    if not (DATA / "pairs" / "qqp-dev.jsonl").is_file():
        pytest.fail(f"test data missing at {DATA}")
    from velo_proxy.settings import Settings

    if not (Path(Settings().embedder_dir) / "model.onnx").is_file():
        pytest.fail("embedder not exported: run `velo-proxy models export`")


class _StubLRS:
    """Stands in for the LRS actor (whose ONNX file may not exist yet) so the LRS code path runs:
    P(A) rises with the best hit's similarity."""

    top_p = 5
    version = "stub"

    def __init__(self, delta: float) -> None:
        self.threshold = {0.01: 0.9, 0.02: 0.8, 0.05: 0.6, 0.1: 0.5}[delta]

    def probs(self, observations):  # noqa: ANN001
        out = []
        for o in observations:
            s = float(o.hit_features[0, 0]) if o.hit_mask[0] > 0 else 0.0
            pa = min(1.0, max(0.0, (s - 0.7) / 0.3))
            out.append([pa, 1.0 - pa, 0.0])
        return np.asarray(out, dtype=np.float32)

    def decide(self, vector, hits, *, now, scores=None, request_text=None):  # noqa: ANN001
        from velo_proxy import features as F
        from velo_proxy.policy import Decision

        obs = F.build_observation(vector, hits, top_p=self.top_p, now=now)
        p = self.probs([obs])[0]
        if hits and p[0] >= self.threshold:
            return Decision("A", hits[F.select_entry(hits, top_p=self.top_p)], 1.0, tuple(map(float, p)))
        return Decision("B", None, 1.0, tuple(map(float, p)))


def test_quality_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_data_and_embedder()
    import quality

    monkeypatch.setattr(quality, "load_lrs", lambda embedder, delta, verifier=None, path=None: _StubLRS(delta))
    out = tmp_path / "q.json"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    argv = ["--tiny", "--workloads", "qqp", "gptcache-mock", "--json", str(out), "--doc", str(doc), "--img-dir", str(tmp_path / "img")]
    assert quality.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["workloads"]) == {"qqp", "gptcache-mock"}
    for name, w in r["workloads"].items():
        assert w["requests"] == w["positives"] + w["negatives"] > 0
        for curve in ("threshold", "lrs"):
            pts = w["curves"][curve]
            assert pts and all({"hit_rate", "fhr", "fpr", "precision", "threshold"} <= set(p) for p in pts)
        for system in ("threshold 0.95", "threshold 0.8", "LRS δ=0.02", "oracle (top-5)"):
            p = w["points"][system]
            assert 0.0 <= p["hit_rate"] <= 1.0 and 0.0 <= p["fhr"] <= 1.0
            assert p["correct"] + p["false"] == p["hits"]
        assert w["points"]["oracle (top-5)"]["false"] == 0
        assert set(w["at_fhr"]["threshold"]) == {"0.01", "0.02", "0.05"}
        # the replay (curves) agrees with the real store (operating points)
        for check in w["check"].values():
            assert check["same_decisions"] == 1.0
    mock = r["mock_protocol"]
    assert all(v["positive"] + v["negative"] + v["fail"] == r["args"]["mock_pairs"] for v in mock.values())
    text = doc.read_text()
    assert "hand-written intro" in text and "<!-- quality:begin -->" in text and "<!-- quality:end -->" in text
    assert (tmp_path / "img" / "bench-quality-curves.png").stat().st_size > 1000
    # without the verified policy's rows (--no-verifier) the report still names the LRS it measured
    for verifier in (r["verifier"], None):
        body = quality.markdown({**r, "verifier": verifier}, "cmd")
        assert "LRS policy: `stub`" in body and "not present" not in body
    # two runs' learned actors side by side (--policy-file runs: the shipped LRS, a DLRS export)
    assert quality.main(["--compare-learned", str(out), str(out), "--doc", str(doc)]) == 0
    learned = doc.read_text().split("<!-- learned:begin -->")[1].split("<!-- learned:end -->")[0]
    assert "| qqp | 10 % |" in learned and learned.count("`stub`") >= 3 and "hand-written intro" in doc.read_text()
    # rerunning replaces the section instead of appending a second one
    quality.write_section(doc, "quality", "again")
    assert doc.read_text().count("<!-- quality:begin -->") == 1 and "again" in doc.read_text()


def test_verifiers_smoke(tmp_path: Path) -> None:
    """benchmarks/verifiers.py: the English verifier and both exports of the multilingual one, each at its
    own calibrated points, on the same held-out streams; the section is written into the doc."""
    _need_data_and_embedder()
    import verifiers

    out, doc = tmp_path / "v.json", tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    assert verifiers.main(["--tiny", "--workloads", "qqp", "paws-wiki", "--json", str(out), "--doc", str(doc)]) == 0
    r = json.loads(out.read_text())
    assert set(r["verifiers"]) == {"English (MiniLM) int8", "multilingual (e5) fp32", "multilingual (e5) int8"}
    assert all(v["speed"]["p50_ms"] > 0 for v in r["verifiers"].values())
    calibrated = {name for name, v in r["verifiers"].items() if v["thresholds"]}
    assert calibrated == {"multilingual (e5) fp32", "multilingual (e5) int8"}  # the English card holds no bound
    for w in r["workloads"].values():
        assert w["rows"]["oracle (top-5)"]["false"] == 0
        points = [k for k in w["rows"] if ", δ=" in k]
        assert {k.split(",")[0] for k in points} == calibrated  # every verifier at its calibrated δ
        assert w["rows"]["English (MiniLM) int8: no δ holds"] is None
        for k in points:
            m = w["rows"][k]
            assert m["correct"] + m["false"] == m["hits"] and 0 <= m["fhr_estimated"] <= m["fhr"] + 1e-9
    assert "<!-- verifiers:begin -->" in doc.read_text() and "| multilingual (e5) int8, δ=0.1 |" in doc.read_text()


def test_latency_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_data_and_embedder()
    # mechanics, not speed: on a busy machine a verifier call past its 300 ms deadline would turn the few
    # semantic-hit bodies into misses (the proxy fails safe); the proxy subprocess inherits these
    monkeypatch.setenv("VELO_VERIFIER_TIMEOUT_MS", "5000")
    monkeypatch.setenv("VELO_EMBED_TIMEOUT_MS", "5000")
    if shutil.which("wrk") is None:
        pytest.fail("wrk not installed: run `make tools` (apt-get install -y wrk)")
    import latency

    out = tmp_path / "l.json"
    doc = tmp_path / "benchmarks.md"
    argv = ["--sizes", "500", "--concurrency", "2", "--upstream-latency-ms", "20", "--hit-bodies", "80",
            "--miss-bodies", "100", "--exact-bodies", "10", "--hit-seconds", "1", "--miss-seconds", "2",
            "--warmup", "10", "--ttfb-concurrency", "1", "--ttfb-requests", "5", "--qdrant-size", "0",
            "--no-gptcache", "--json", str(out), "--doc", str(doc), "--img-dir", str(tmp_path / "img")]
    assert latency.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["upstream"]) == {"2"}
    cfg = r["configs"]["embedded-500"]
    assert cfg["entries"] == 500 and cfg["peak_rss_mb"] > 0
    for case in ("semantic hit", "exact hit", "miss"):
        row = cfg["cases"][case]["2"]
        assert row["requests"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
    assert cfg["cases"]["semantic hit"]["2"]["actions"]["A"] > 0
    assert cfg["cases"]["exact hit"]["2"]["actions"]["exact"] > 0
    assert "overhead_p50_ms" in cfg["cases"]["miss"]["2"]
    assert cfg["cases"]["streamed hit TTFB"]["1"]["requests"] == 5
    assert "<!-- latency:begin -->" in doc.read_text()
    assert (tmp_path / "img" / "bench-latency.png").stat().st_size > 1000


def test_verified_by_language_smoke() -> None:
    """benchmarks/multilingual_quality.py --verified (#16): the default verifier per PAWS-X language, calibrated
    on the calibration rows of its own training split, measured on the held-out rows; the rows it was trained on
    never enter, and the card's thresholds are applied as shipped. MiniLM only here (e5 costs an export)."""
    _need_data_and_embedder()
    import multilingual_quality as MQ

    from policy.verifier_multilingual import MultilingualConfig, pawsx_split
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    res = MQ.verified_by_language({"MiniLM": OnnxEmbedder(Settings().embedder_dir, threads=2)}, DATA, 0, 2)
    split = pawsx_split(MultilingualConfig())
    assert res["split_rows"] == {k: len(v) for k, v in split.items()} and not split["train"] & split["heldout"]
    r = res["embedders"]["MiniLM"]
    card = PairVerifier(Settings().verifier_dir, embedder_id=OnnxEmbedder(Settings().embedder_dir).id).calibration
    assert r["cosine_floor"] == card["cosine_floor"] and r["card_thresholds"] == {
        str(float(k)): float(t) for k, t in card["thresholds"].items()}
    assert set(r["pawsx"]) == set(MQ.PAWS_LANGS) and set(r["xquad_within"]) == set(MQ.XQ_LANGS)
    for lang, row in r["pawsx"].items():
        for kind in ("card", "per_language", "pooled"):
            for d, m in row[kind].items():
                if m is not None:
                    assert m["correct"] + m["false"] == m["hits"] and m["positives"] == row["heldout_positives"], (lang, kind, d)
                    assert m["hits"] == 0 or 0 <= m["fhr_labelled"] <= m["fhr"] <= m["upper_bound"] <= 1
    body = MQ.verified_markdown(res, "cmd", 1.0)
    assert "| de |" in body and "| ru |" in body and "card δ=0.1" in body


def test_learned_policy_by_language_smoke() -> None:
    """benchmarks/multilingual_quality.py --lrs (#16): the learned policy shipped for the embedder, run as the
    proxy runs it, on each PAWS-X language and on XQuAD across languages; every decision is counted once,
    by the relation of its Eq. 4 entry to the request, and A is exactly what the cache served."""
    _need_data_and_embedder()
    import multilingual_quality as MQ

    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings

    res = MQ.lrs_by_language({"MiniLM": OnnxEmbedder(Settings().embedder_dir, threads=2)}, DATA, 40, 0, 2)["MiniLM"]
    assert res["policy"].startswith("lrs-default") and set(res["pawsx"]) == set(MQ.PAWS_LANGS)
    for key, m in [*((k, v) for r in res["pawsx"].values() for k, v in r.items() if isinstance(v, dict)),
                   *res["xquad_across"].items()]:
        served = sum(c["A"] for c in m["actions"].values())
        assert served == m["hits"] and m["false"] <= m["hits"], key
        if key == "0.02" and res["taus"]["0.02"] > 1.0:
            assert m["hits"] == 0  # no threshold for δ: never A
    across = res["xquad_across"]["0.02"]["actions"]
    assert "same question, another language" in across and "another question, the same language" in across
    assert sum(sum(c.values()) for c in across.values()) < 5 * 60  # one decision per request with a cached entry
    body = MQ.lrs_markdown({"MiniLM": res}, "cmd", 1.0)
    assert "| MiniLM (`lrs-default" in body and "same question, another language" in body


def test_quality_lrs_rows_keep_their_verifier_without_the_verified_rows():
    """benchmarks/quality.py --no-verifier drops the verified policy's rows, not the learned policy's features:
    its verifier loads anyway, with the calibration block of the embedder the benchmark runs (its cosine floor
    decides which hits are verified)."""
    import argparse

    import quality

    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings

    _need_data_and_embedder()
    args = argparse.Namespace(verifier=False, threads=1)
    minilm = OnnxEmbedder(Settings().embedder_dir).id
    assert quality.load_verifier(args, embedder_id=minilm) is None
    floors = {}
    for embedder_id in (minilm, "intfloat/multilingual-e5-small-q4"):
        v = quality.load_verifier(args, embedder_id=embedder_id, learned=True)
        assert v is not None and v.embedder_id == embedder_id
        floors[embedder_id] = v.rule(0.1).cosine_floor
    assert floors[minilm] < floors["intfloat/multilingual-e5-small-q4"]  # e5's cosines run higher


def test_quality_workloads_leave_out_what_the_policy_was_trained_on():
    import quality
    from policy.data import DataSpec, training_texts

    _need_data_and_embedder()
    # On the slices, the tiny spec's training texts (on the full data, the default spec's: quality.evaluate)
    trained = training_texts(DataSpec.tiny())
    kw = dict(qqp_pairs=3000, paws_pairs=10, pawsx_pairs=10, xquad_questions=2000, mock_pairs=10)
    held_out = {w.name: w for w in quality.load_workloads(["qqp", "xquad"], exclude=trained, **kw)}
    everything = {w.name: w for w in quality.load_workloads(["qqp", "xquad"], **kw)}
    for name in ("qqp", "xquad"):
        assert not set(held_out[name].texts) & trained
        assert set(everything[name].texts) & trained  # without the filter they would overlap
    # only the rows with a trained text go: the workload keeps the rest
    assert len(held_out["qqp"].texts) >= len(everything["qqp"].texts) - 2 * len(trained) > 0


def test_learning_loop_smoke(tmp_path: Path) -> None:
    _need_data_and_embedder()
    import learning_loop

    out = tmp_path / "ll.json"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n")
    # every hit and near miss judged: the tiny stream's false hits are then sure to reach the guard
    argv = ["--tiny", "--shadow-rate", "1", "--near-miss-review-rate", "1", "--json", str(out), "--doc", str(doc),
            "--img-dir", str(tmp_path / "img")]
    assert learning_loop.main(argv) == 0
    r = json.loads(out.read_text())
    a, wins = r["analysis"], r["windows"]
    assert r["workload"]["requests"] == 300 and len(wins) == 6
    assert sum(w["requests"] for w in wins) == 300 and wins[-1]["end"] == 300
    for w in wins:
        assert w["correct"] + w["false"] == w["hits"] and w["errors"] == 0
    assert a["overall"]["hits"] > 0 and a["overall"]["false"] > 0
    # the oracle judge agrees with the clusters; every judgement the proxy counted is in its label store
    assert a["judge_vs_truth"]["agree"] == a["judge_vs_truth"]["judgements"] == wins[-1]["judge_calls"] > 0
    assert a["judgements"]["shadow"] == a["overall"]["hits"]  # shadow rate 1
    # the guard saw a wrong hit and raised its floor; the run places both on the request axis
    assert a["first_wrong_judgement"] is not None and a["first_floor_rise"] is not None
    assert a["first_floor_rise"]["at"] >= a["first_wrong_judgement"]["known_at"] >= a["first_false_hit_request"]
    assert wins[-1]["floor"] is not None and wins[-1]["guard_tighten"] >= 1
    # the served answer's cluster and the served entry's cluster agree (no alias holds another cluster's answer)
    assert a["entry_checks"]["entry_unknown"] == 0 and a["entry_checks"]["answer_cluster_differs_from_entry"] == 0
    text = doc.read_text()
    assert "hand-written intro" in text and "<!-- learning-loop:begin -->" in text and "<!-- learning-loop:end -->" in text
    assert "| requests | positives |" in text and "**Reading.**" in text
    assert (tmp_path / "img" / "bench-learning-loop.png").stat().st_size > 1000
    # the doc can be rewritten from the JSON alone, naming the command that measured
    again = tmp_path / "again.md"
    assert learning_loop.main(["--from-json", str(out), "--doc", str(again), "--img-dir", str(tmp_path / "img2")]) == 0
    assert f"```bash\n{r['command']}\n```" in again.read_text() and r["command"].endswith(str(tmp_path / "img"))
    learning_loop.write_section(doc, "learning-loop", "again")
    assert doc.read_text().count("<!-- learning-loop:begin -->") == 1 and "again" in doc.read_text()


def test_pair_scorer_scores_the_near_pairs_up_front_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 verifier_dir: Path) -> None:
    """benchmarks/quality.py's LRS rows: the likely (request, earlier request) pairs are scored first in
    batched calls, and a prefetched score is the score the pair gets when asked on its own."""
    _need_data_and_embedder()
    import common
    import quality
    from policy import data as D
    from velo_proxy.verifier import PairVerifier

    monkeypatch.setattr(D, "cache_dir", lambda: tmp_path)  # a fresh ScoreCache: nothing is scored yet
    [w] = quality.load_workloads(["qqp"], qqp_pairs=40, paws_pairs=0, pawsx_pairs=0, xquad_questions=0, mock_pairs=0)
    quality.embed_workloads([w], common.EmbeddingCache(common.load_embedder(threads=2)))
    verifier = PairVerifier(verifier_dir, threads=2)
    batched_calls = []
    score_many = verifier.score_many
    monkeypatch.setattr(verifier, "score_many", lambda a, b, **kw: batched_calls.append(len(a)) or score_many(a, b, **kw))
    score = quality.pair_scorer(w, verifier)
    assert score.prefetched > 0 and len(batched_calls) == 1  # one batched pass over them (distinct pairs)
    assert 0 < batched_calls[0] <= score.prefetched
    i, j = score.pairs[0]
    lone = quality.pair_scorer(w, verifier, prefetch=0)
    assert lone.prefetched == 0
    monkeypatch.setattr(D, "cache_dir", lambda: tmp_path / "fresh")
    (tmp_path / "fresh").mkdir()
    assert abs(quality.pair_scorer(w, verifier, prefetch=0)(i, j) - score(i, j)) < 1e-5
    assert batched_calls[-1] == 1  # the lone scorer scored that pair by itself


def test_quality_refuses_a_missing_policy_file_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import quality

    with pytest.raises(SystemExit) as exc:
        quality.main(["--tiny", "--no-doc", "--policy-file", str(tmp_path / "missing.onnx"), "--json", str(tmp_path / "q.json")])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()  # nothing was measured
