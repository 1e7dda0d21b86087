"""The learned policy in the proxy: ONNX actor chosen decisions, metadata checks, action C, the
experience stream, shadow verification, feedback, hot reload under load. Real redis-server, real
embedder, fake upstream, openai SDK."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import redis

from tests.policy_builders import export_rule_policy
from tests.test_cache import ADMIN, ask, settle
from velo_proxy import features as F
from velo_proxy.experience import decode_observation, stream_key
from velo_proxy.policy import PolicyDirectory

EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def paraphrase(test_data):
    pairs = json.loads((test_data / "pairs" / "gptcache-mock-paraphrases.json").read_text())
    # cosine 0.987 (MiniLM), default verifier 0.74: a hit the shadow judge (pair score >= 0.5) calls right
    return pairs[1]["origin"], pairs[1]["similar"]


@pytest.fixture()
def serve_policy(tmp_path):
    return export_rule_policy(tmp_path / "serve.onnx", embedder_id=EMBEDDER_ID, version="rule-serve")


def stream_entries(url: str, agent: str) -> list[dict]:
    client = redis.Redis.from_url(url, decode_responses=True)
    return [fields for _, fields in client.xrange(stream_key(agent))]


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_learned_policy_serves_and_logs_experience(make_proxy, embedder_dir, redis_server, serve_policy,
                                                    paraphrase, upstream_requests):
    original, similar = paraphrase
    proxy = make_proxy(policy="learned", policy_path=serve_policy, redis_url=redis_server.url, agent_id="edge-1",
                       admin_key=ADMIN, shadow_rate=0.0)
    first, h1 = ask(proxy, original)
    assert h1["x-velo-policy"] == "rule-serve" and h1["x-velo-action"] == "B"
    settle(proxy)
    second, h2 = ask(proxy, similar)
    assert h2["x-velo-action"] == "A" and second.choices[0].message.content == first.choices[0].message.content

    def decisions():
        found = [e for e in stream_entries(redis_server.url, "edge-1") if e["kind"] == "decision"]
        return found if len(found) >= 2 else None

    entries = wait_for(decisions)
    assert [e["action"] for e in entries] == ["B", "A"]
    served = entries[1]
    assert served["entry"] == h1["x-velo-entry"] and served["policy"] == "rule-serve"
    assert float(served["prob"]) == 1.0 and float(json.loads(served["probs"])[0]) > 0.5
    obs = decode_observation(served["obs"], dim=int(served["dim"]), top_p=int(served["top_p"]), k=int(served["k"]))
    assert obs.hit_mask.tolist() == [1, 0, 0, 0, 0]
    assert obs.hit_features[0, F.HIT_FEATURE_NAMES.index("similarity")] == pytest.approx(float(h2["x-velo-similarity"]), abs=1e-3)
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'velo_policy_info{version="rule-serve"} 1.0' in metrics


def test_action_c_augments_the_prompt_and_caches_the_answer(make_proxy, embedder_dir, tmp_path, paraphrase,
                                                            upstream_requests):
    original, similar = paraphrase
    augment = export_rule_policy(tmp_path / "c.onnx", embedder_id=EMBEDDER_ID, version="rule-augment",
                                 serve_above=2.0, c_logit=5.0)
    proxy = make_proxy(policy="learned", policy_path=augment, admin_key=ADMIN)
    first, _ = ask(proxy, original, history=[{"role": "system", "content": "You are terse."}])
    settle(proxy)
    answer, headers = ask(proxy, similar, history=[{"role": "system", "content": "You are terse."}])
    assert headers["x-velo-action"] == "C"
    sent = upstream_requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "system", "user"]
    assert sent[0]["content"] == "You are terse." and sent[-1]["content"] == similar
    assert original in sent[1]["content"] and first.choices[0].message.content in sent[1]["content"]
    assert answer.choices[0].message.content.endswith(similar)  # the upstream's fresh answer
    assert settle(proxy)["store"]["entries"] == 2  # C's answer is cached under the user's question
    _, again = ask(proxy, similar, history=[{"role": "system", "content": "You are terse."}])
    assert again["x-velo-action"] == "exact"


def test_mismatched_policy_is_refused_at_start(make_proxy, embedder_dir, tmp_path):
    wrong = export_rule_policy(tmp_path / "wrong.onnx", embedder_id="intfloat/multilingual-e5-small", version="x")
    with pytest.raises(RuntimeError):
        make_proxy(policy="learned", policy_path=wrong)
    from velo_proxy.policy import LearnedPolicy, PolicyMismatch

    with pytest.raises(PolicyMismatch, match="trained on embedder 'intfloat/multilingual-e5-small'"):
        LearnedPolicy(wrong, embedder_id=EMBEDDER_ID, dim=384, max_false_hit_rate=0.02)
    with pytest.raises(PolicyMismatch, match="D=384"):
        LearnedPolicy(wrong, embedder_id="intfloat/multilingual-e5-small", dim=768, max_false_hit_rate=0.02)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx file")
    with pytest.raises(PolicyMismatch, match="not a loadable ONNX model"):
        LearnedPolicy(corrupt, embedder_id=EMBEDDER_ID, dim=384, max_false_hit_rate=0.02)


def test_a_policy_trained_on_another_verifiers_scores_is_refused(make_proxy, embedder_dir, learned_verifier_dir,
                                                                verifier_dir, tmp_path):
    """The verifier's scores are hit features: a policy that learned from another verifier's scores is
    refused beside this one, at start and by the loader; the shipped default says which verifier it
    learned from, and it is the shipped one."""
    import onnxruntime as ort

    from velo_proxy.policy import LearnedPolicy, PolicyMismatch, default_policy_path

    installed = json.loads((learned_verifier_dir / "velo_verifier.json").read_text())["source_sha256"]
    shipped = dict(ort.InferenceSession(str(default_policy_path()),
                                        providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)
    assert shipped["velo_verifier_sha256"] == installed
    other = export_rule_policy(tmp_path / "other.onnx", embedder_id=EMBEDDER_ID, version="other-verifier",
                               verifier_sha256="0" * 64)
    with pytest.raises(PolicyMismatch, match="trained on the scores of verifier weights 000000000000"):
        LearnedPolicy(other, embedder_id=EMBEDDER_ID, dim=384, max_false_hit_rate=0.02, verifier_sha256=installed)
    with pytest.raises(RuntimeError):
        make_proxy(policy="learned", policy_path=other)
    same = export_rule_policy(tmp_path / "same.onnx", embedder_id=EMBEDDER_ID, version="same-verifier",
                              verifier_sha256=installed)
    proxy = make_proxy(policy="learned", policy_path=same)
    assert ask(proxy, "What is the boiling point of water?")[1]["x-velo-policy"] == "same-verifier"


def test_calibrated_bound_controls_serving(make_proxy, embedder_dir, tmp_path, paraphrase, upstream_requests):
    original, similar = paraphrase
    # P(A) of this paraphrase is ~0.87 (similarity 0.969, serve_above 0.94); thresholds per delta:
    policy = export_rule_policy(tmp_path / "cal.onnx", embedder_id=EMBEDDER_ID, version="rule-cal",
                                serve_above=0.94, thresholds={"0.005": 0.99, "0.05": 0.5})
    strict = make_proxy(policy="learned", policy_path=policy, admin_key=ADMIN, max_false_hit_rate=0.01)
    ask(strict, original)
    settle(strict)
    assert ask(strict, similar)[1]["x-velo-action"] == "B"
    lenient = make_proxy(policy="learned", policy_path=policy, admin_key=ADMIN, max_false_hit_rate=0.05)
    ask(lenient, original)
    settle(lenient)
    assert ask(lenient, similar)[1]["x-velo-action"] == "A"


def test_exploration_logs_its_probability(make_proxy, embedder_dir, redis_server, serve_policy, paraphrase):
    original, similar = paraphrase
    proxy = make_proxy(policy="learned", policy_path=serve_policy, redis_url=redis_server.url, agent_id="explorer",
                       admin_key=ADMIN, exploration_rate=1.0, shadow_rate=0.0)
    ask(proxy, original)
    settle(proxy)
    for _ in range(6):
        ask(proxy, similar, headers={"cache-control": "no-store"})
    decisions = wait_for(lambda: [e for e in stream_entries(redis_server.url, "explorer")
                                  if e["kind"] == "decision" and e["explored"] == "1"])
    assert decisions and all(float(e["prob"]) == pytest.approx(1 / 3, abs=1e-6) for e in decisions)


def test_shadow_check_rewards_and_evicts(make_proxy, embedder_dir, redis_server, serve_policy, paraphrase):
    original, similar = paraphrase
    proxy = make_proxy(policy="learned", policy_path=serve_policy, redis_url=redis_server.url, agent_id="shadow",
                       admin_key=ADMIN, shadow_rate=1.0)
    ask(proxy, original)
    settle(proxy)
    _, served = ask(proxy, similar)
    assert served["x-velo-action"] == "A"
    settle(proxy)
    rewards = wait_for(lambda: [e for e in stream_entries(redis_server.url, "shadow") if e["kind"] == "reward"])
    assert rewards[0]["source"] == "shadow" and rewards[0]["request_id"] == served["x-request-id"]
    assert float(rewards[0]["score"]) >= 0.7  # the fresh answer agrees with the cached one
    entry = httpx.get(f"{proxy.url}/admin/entries/{served['x-velo-entry']}",
                      headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert entry["use_count"] >= 2 and entry["cache_value"] > 0

    # a cached answer that a fresh one contradicts is evicted
    ask(proxy, original, model="fake-random")
    settle(proxy)
    _, bad = ask(proxy, similar, model="fake-random")
    assert bad["x-velo-action"] == "A"
    settle(proxy)
    gone = httpx.get(f"{proxy.url}/admin/entries/{bad['x-velo-entry']}", headers={"authorization": f"Bearer {ADMIN}"})
    assert gone.status_code == 404
    assert 'velo_shadow_checks_total{result="fail"} 1.0' in httpx.get(f"{proxy.url}/metrics").text


def test_feedback_endpoint(make_proxy, embedder_dir, redis_server, serve_policy, paraphrase):
    original, similar = paraphrase
    proxy = make_proxy(policy="learned", policy_path=serve_policy, redis_url=redis_server.url, agent_id="fb",
                       admin_key=ADMIN, shadow_rate=0.0)
    ask(proxy, original)
    settle(proxy)
    completion, headers = ask(proxy, similar)
    response = httpx.post(f"{proxy.url}/v1/feedback", json={"id": completion.id, "score": 0.0})
    assert response.status_code == 200
    assert response.json()["request_id"] == headers["x-request-id"] and response.json()["experience"] is True
    rewards = wait_for(lambda: [e for e in stream_entries(redis_server.url, "fb") if e["kind"] == "reward"])
    assert rewards[-1]["source"] == "feedback" and float(rewards[-1]["score"]) == 0.0
    entry = httpx.get(f"{proxy.url}/admin/entries/{headers['x-velo-entry']}", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert entry["use_count"] >= 2
    assert httpx.post(f"{proxy.url}/v1/feedback", json={"id": "chatcmpl-unknown", "score": 1}).status_code == 404
    bad = httpx.post(f"{proxy.url}/v1/feedback", json={"id": completion.id, "score": 7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"


def test_without_redis_experience_is_off_and_serving_works(make_proxy, embedder_dir, serve_policy, paraphrase):
    proxy = make_proxy(policy="learned", policy_path=serve_policy, admin_key=ADMIN)
    assert ask(proxy, paraphrase[0])[0].choices[0].message.content
    ready = httpx.get(f"{proxy.url}/readyz").json()
    assert ready["checks"]["experience"]["detail"] == "off (no Redis)"


def test_hot_reload_under_load_without_failed_requests(make_proxy, embedder_dir, tmp_path, paraphrase):
    original, similar = paraphrase
    directory = PolicyDirectory(tmp_path / "policies")
    v1 = export_rule_policy(tmp_path / "v1.onnx", embedder_id=EMBEDDER_ID, version="lrs-v1")
    directory.publish(v1.read_bytes(), version="lrs-v1")
    proxy = make_proxy(policy="learned", policy_dir=directory.root, policy_reload_s=0.1, admin_key=ADMIN)
    assert ask(proxy, original)[1]["x-velo-policy"] == "lrs-v1"
    settle(proxy)

    seen: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
        i = 0
        while not stop.is_set():
            try:
                question = similar if i % 2 else f"Load question {i} about something else entirely?"
                raw = client.chat.completions.with_raw_response.create(
                    model="fake-model", messages=[{"role": "user", "content": question}])
                assert raw.parse().choices[0].message.content
                seen.append(raw.headers["x-velo-policy"])
            except BaseException as exc:  # noqa: BLE001
                failures.append(exc)
            i += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    bad = export_rule_policy(tmp_path / "bad.onnx", embedder_id="someone/else", version="lrs-v2-bad")
    directory.publish(bad.read_bytes(), version="lrs-v2-bad")
    time.sleep(0.5)
    v3 = export_rule_policy(tmp_path / "v3.onnx", embedder_id=EMBEDDER_ID, version="lrs-v3", serve_above=0.95)
    directory.publish(v3.read_bytes(), version="lrs-v3")
    assert wait_for(lambda: seen and seen[-1] == "lrs-v3", timeout_s=10)
    time.sleep(0.3)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    assert failures == []
    assert len(seen) > 20
    assert "lrs-v2-bad" not in seen and {"lrs-v1", "lrs-v3"} <= set(seen)
    assert seen.index("lrs-v3") > seen.index("lrs-v1")
    assert 'velo_component_failures_total{component="policy",reason="rejected"} 1.0' in httpx.get(f"{proxy.url}/metrics").text


def test_republished_file_is_named_by_the_directory_and_loaded_once(make_proxy, embedder_dir, tmp_path):
    directory = PolicyDirectory(tmp_path / "policies")
    v1 = export_rule_policy(tmp_path / "v1.onnx", embedder_id=EMBEDDER_ID, version="metadata-name")
    directory.publish(v1.read_bytes(), version="published-a")
    proxy = make_proxy(policy="learned", policy_dir=directory.root, policy_reload_s=0.05, admin_key=ADMIN)
    assert ask(proxy, "Which version?")[1]["x-velo-policy"] == "published-a"
    directory.publish(v1.read_bytes(), version="published-b")  # the same file under a new name
    assert wait_for(lambda: ask(proxy, "Which version now?", headers={"cache-control": "no-store"})[1]["x-velo-policy"] == "published-b")
    time.sleep(0.5)  # ten reload intervals: nothing new, nothing reloaded
    assert "velo_policy_reloads_total 1.0" in httpx.get(f"{proxy.url}/metrics").text


def test_simulator_and_proxy_build_identical_observations(make_proxy, embedder_dir, learned_verifier_dir,
                                                          redis_server, serve_policy, paraphrase):
    """The same request through the proxy (store, engine, experience stream) and through the training
    simulator's cache (policy.sim.EdgeCache) gives the same observation."""
    from policy.sim import EdgeCache, SimEntry
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.language import language_tag

    original, similar = paraphrase
    proxy = make_proxy(policy="learned", policy_path=serve_policy, redis_url=redis_server.url, agent_id="same",
                       admin_key=ADMIN, shadow_rate=0.0)
    _, stored = ask(proxy, original)
    settle(proxy)
    entry = httpx.get(f"{proxy.url}/admin/entries/{stored['x-velo-entry']}", headers={"authorization": f"Bearer {ADMIN}"}).json()
    _, served = ask(proxy, similar)
    assert served["x-velo-action"] == "A"

    def decisions():
        found = [e for e in stream_entries(redis_server.url, "same") if e["kind"] == "decision" and e["action"] == "A"]
        return found or None

    logged = wait_for(decisions)[0]
    proxy_obs = decode_observation(logged["obs"], dim=384, top_p=5, k=F.K)

    embedder = OnnxEmbedder(embedder_dir)
    u_original, u_similar = embedder.embed_sync([original]), embedder.embed_sync([similar])
    cache = EdgeCache(dim=384, capacity=8)
    cache.add(SimEntry(vector=u_original[0], answer=np.zeros(384, np.float32), cluster=0,
                       created_at=entry["created_at"], use_count=entry["use_count"], cache_value=entry["cache_value"]))
    # the simulator's verifier path (policy.pair_scores) with the proxy's verifier and rule
    from types import SimpleNamespace

    from policy.pair_scores import PairScores
    from velo_proxy.verifier import PairVerifier

    verifier = PairVerifier(learned_verifier_dir)  # the learned policy's (VELO_POLICY=learned loads it)
    scorer = PairScores(rule=verifier.rule(0.02), verifier_key="test", _scorer=verifier.score_pairs)
    sim_hits = cache.search(u_similar[0], 5)
    sim_hits[0].entry.qid = 1
    scores = scorer.lookup(SimpleNamespace(q_text=[similar, original]), [(0, sim_hits)])[0]
    assert list(scores) == [0] and 0 < scores[0] <= 1  # the one hit, above the cosine floor, is verified
    sim_hits[0].entry.language = language_tag(original)  # the simulator's entries carry their tag
    sim_obs = F.build_observation(u_similar[0], sim_hits, top_p=5, now=float(logged["obs_now"]), scores=scores,
                                  request_language=language_tag(similar))
    for name in ("request_embedding", "hit_embeddings", "hit_features", "hit_mask"):
        np.testing.assert_allclose(getattr(proxy_obs, name), getattr(sim_obs, name), atol=1e-5, err_msg=name)
    assert proxy_obs.hit_features[0, F.HIT_FEATURE_NAMES.index("verified")] == 1.0
    assert float(served["x-velo-verifier"]) == pytest.approx(scores[0], abs=1e-3)


def test_observation_encoding_round_trip():
    rng = np.random.default_rng(0)
    obs = F.Observation(rng.standard_normal(384).astype(np.float32), rng.standard_normal((5, 384)).astype(np.float32),
                        rng.standard_normal((5, F.K)).astype(np.float32), np.array([1, 1, 0, 0, 0], np.float32))
    from velo_proxy.experience import encode_observation

    back = decode_observation(encode_observation(obs), dim=384, top_p=5, k=F.K)
    assert np.array_equal(back.request_embedding, obs.request_embedding)
    assert np.array_equal(back.hit_mask, obs.hit_mask)


def test_default_proxy_runs_the_shipped_policy(make_proxy, embedder_dir, paraphrase):
    proxy = make_proxy(policy="learned", admin_key=ADMIN)
    _, headers = ask(proxy, paraphrase[0])
    assert headers["x-velo-policy"] == "lrs-default-6"
    ready = httpx.get(f"{proxy.url}/readyz").json()
    assert ready["checks"]["policy"]["detail"] == "lrs-default-6"


def test_the_actor_reads_the_verifier_scores_and_the_veto_has_the_last_word(tmp_path):
    """Feature version 2: the scores the engine passes to ``decide`` reach the ONNX actor as hit features
    (an actor that serves on the verifier's score serves exactly the well-scored hits); with the veto an A
    still needs the verifier's own threshold."""
    from types import SimpleNamespace

    from velo_proxy.policy import LearnedPolicy
    from velo_proxy.verifier import VerifyRule

    path = export_rule_policy(tmp_path / "on-score.onnx", embedder_id=EMBEDDER_ID, version="on-score",
                              serve_above=0.5, on="verifier_score")
    rng = np.random.default_rng(0)
    u = rng.standard_normal(384).astype(np.float32)
    u /= np.linalg.norm(u)
    hits = [SimpleNamespace(similarity=0.96, entry=SimpleNamespace(vector=u, kind=0, cache_value=0.0, use_count=0,
                                                                   created_at=0.0))]
    rule = VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.95)

    def decide(scores, *, veto):
        policy = LearnedPolicy(path, embedder_id=EMBEDDER_ID, dim=384, max_false_hit_rate=0.02, verify_rule=rule,
                               veto=veto)
        assert policy.to_verify(hits) == [0]
        return policy.decide(u, hits, now=1.0, scores=scores)

    served = decide({0: 0.9}, veto=False)
    assert served.action == "A" and served.verifier_score == pytest.approx(0.9)
    row = dict(zip(F.HIT_FEATURE_NAMES, served.observation.hit_features[0]))
    assert row["verified"] == 1.0 and row["verifier_score"] == pytest.approx(0.9)
    assert decide({0: 0.1}, veto=False).action == "B"  # same similarity, a low score: forwarded
    assert decide(None, veto=False).action == "B"  # the verifier failed: nothing verified, nothing served
    vetoed = decide({0: 0.9}, veto=True)  # the actor would serve; 0.9 is below the verifier's 0.95
    assert vetoed.action == "B" and vetoed.vetoed
    assert decide({0: 0.97}, veto=True).action == "A"


def test_an_embedder_without_a_shipped_policy_runs_the_verified_policy_and_says_why(make_proxy, int8_embedder_dir):
    """The package ships a learned policy per embedder (MiniLM and multilingual-e5-small); with another one
    (MiniLM int8: its vectors differ) VELO_POLICY=learned falls back to the verified policy, never the
    unverified threshold, and the admin stats say why."""
    proxy = make_proxy(policy="learned", embedder="all-MiniLM-L6-v2-int8", embedder_dir=int8_embedder_dir,
                       admin_key=ADMIN)
    _, headers = ask(proxy, "What is the boiling point of water?")
    assert headers["x-velo-policy"].startswith("verified")
    stats = httpx.get(f"{proxy.url}/admin/stats", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert "ships no learned policy for embedder 'sentence-transformers/all-MiniLM-L6-v2-int8'" in \
        stats["load_errors"]["policy"]
