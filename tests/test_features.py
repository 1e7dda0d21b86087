"""velo_proxy.features: the observation contract shared by training and serving."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np

from velo_proxy import features as F
from velo_proxy.language import detect, different_languages, language_tag, script, tags_differ
from velo_proxy.store.base import KIND_ANSWER, CacheEntry, Hit


def _unit(v):
    return (v / np.linalg.norm(v)).astype(np.float32)


def _entry(vec, *, value=0.0, uses=0, created=100.0, kind=0):
    return CacheEntry(scope="s", vector=vec, question="q", answer={}, model="m", expires_at=1e12, kind=kind,
                      created_at=created, use_count=uses, cache_value=value)


def test_contract_constants():
    assert F.K == len(F.HIT_FEATURE_NAMES) and F.K >= 5
    assert F.INPUT_NAMES == ("request_embedding", "hit_embeddings", "hit_features", "hit_mask")
    assert F.ACTIONS == ("A", "B", "C")
    assert isinstance(F.FEATURE_VERSION, int)


def test_build_observation_pads_and_scales():
    rng = np.random.default_rng(0)
    u = _unit(rng.standard_normal(8))
    v1, v2 = _unit(u + 0.1 * rng.standard_normal(8)), _unit(rng.standard_normal(8))
    hits = [Hit(_entry(v1, value=0.5, uses=3, created=90.0), float(u @ v1)),
            Hit(_entry(v2, kind=KIND_ANSWER, created=0.0), float(u @ v2))]
    o = F.build_observation(u, hits, top_p=4, now=100.0)
    assert o.request_embedding.shape == (8,) and o.hit_embeddings.shape == (4, 8)
    assert o.hit_features.shape == (4, F.K) and o.hit_mask.tolist() == [1, 1, 0, 0]
    for a in (o.request_embedding, o.hit_embeddings, o.hit_features, o.hit_mask):
        assert a.dtype == np.float32
    assert np.all(o.hit_embeddings[2:] == 0) and np.all(o.hit_features[2:] == 0)
    f = dict(zip(F.HIT_FEATURE_NAMES, o.hit_features[0]))
    assert math.isclose(f["similarity"], float(u @ v1), rel_tol=1e-6)
    assert math.isclose(f["cache_value"], 0.5) and math.isclose(f["log_use_count"], math.log1p(3) / 5, rel_tol=1e-6)
    assert math.isclose(f["log_age"], math.log1p(10.0) / 15, rel_tol=1e-6)
    assert f["rank"] == 0 and f["gap_to_top"] == 0
    f2 = dict(zip(F.HIT_FEATURE_NAMES, o.hit_features[1]))
    assert f2["kind"] == 1 and f2["rank"] == 0.25
    assert math.isclose(f2["gap_to_top"], float(u @ v1 - u @ v2), rel_tol=1e-5)
    # more hits than P: only the first P are used
    o2 = F.build_observation(u, hits * 3, top_p=4, now=100.0)
    assert o2.hit_mask.tolist() == [1, 1, 1, 1]


def test_no_hits_and_stack():
    u = _unit(np.ones(8))
    o = F.build_observation(u, [], top_p=3, now=0.0)
    assert o.hit_mask.sum() == 0
    batch = F.stack_observations([o, o])
    assert list(batch) == list(F.INPUT_NAMES)
    assert batch["hit_embeddings"].shape == (2, 3, 8) and batch["hit_features"].shape == (2, 3, F.K)


def test_select_entry_eq4():
    v = _unit(np.ones(4))
    assert F.select_entry([]) is None
    hits = [Hit(_entry(v, value=0.0), 0.950), Hit(_entry(v, value=1.0), 0.945), Hit(_entry(v, value=1.0), 0.80)]
    # the proven entry wins a near-tie, not a real similarity gap
    assert F.select_entry(hits) == 1
    assert F.select_entry(hits, value_weight=0.0) == 0
    hf = np.zeros((1, 3, F.K), dtype=np.float32)
    hf[0, :, 0] = [0.95, 0.945, 0.8]
    hf[0, :, F.HIT_FEATURE_NAMES.index("cache_value")] = [0.0, 1.0, 1.0]
    assert F.select_entry_from_features(hf, np.ones((1, 3), dtype=np.float32)).tolist() == [1]


def test_a_hit_cached_in_another_language_says_so():
    """Feature version 3: the cross_language column is 1 where the cached question's language differs from
    the request's (language.tags_differ), 0 where it is the same, unknown, or the request's is not given."""
    rng = np.random.default_rng(1)
    u = _unit(rng.standard_normal(8))
    spanish = dataclasses.replace(_entry(u), question="¿Cuántos balones interceptó Josh Norman?")
    english = dataclasses.replace(_entry(u), question="How many balls did Josh Norman intercept?")
    hits = [Hit(spanish, 0.9), Hit(english, 0.8)]
    column = F.HIT_FEATURE_NAMES.index("cross_language")
    asked = language_tag("Wie viele Bälle fing Josh Norman ab?")
    o = F.build_observation(u, hits, top_p=3, now=1.0, request_language=asked)
    assert o.hit_features[:2, column].tolist() == [1.0, 1.0]
    o = F.build_observation(u, hits, top_p=3, now=1.0, request_language=language_tag("How many balls did he catch?"))
    assert o.hit_features[:2, column].tolist() == [1.0, 0.0]
    assert F.build_observation(u, hits, top_p=3, now=1.0).hit_features[:2, column].tolist() == [0.0, 0.0]
    # an entry that carries its tag (the simulator's) is not re-detected
    tagged = SimpleNamespace(vector=u, kind=0, cache_value=0.0, use_count=0, created_at=0.0, language="zh", question="x")
    o = F.build_observation(u, [Hit(tagged, 0.9)], top_p=1, now=1.0, request_language="latin")
    assert o.hit_features[0, column] == 1.0
    # an undetected Latin-script question is never "another language" of a Latin-script one
    o = F.build_observation(u, [Hit(tagged, 0.9)], top_p=1, now=1.0, request_language="zh")
    assert o.hit_features[0, column] == 0.0


def _reference_rule(a, b):
    """docs/multilingual.md's rule as written: different scripts, or both detected and different."""
    sa, sb = script(a), script(b)
    if sa is None or sb is None:
        return False
    if sa != sb:
        return True
    if sa != "latin":
        return False
    la, lb = detect(a), detect(b)
    return la is not None and lb is not None and la != lb


def test_language_tags_follow_the_documented_rule():
    texts = ["How many balls did Josh Norman intercept?", "¿Cuántos balones interceptó Josh Norman?",
             "Wie viele Bälle fing Josh Norman ab?", "Сколько мячей перехватил Джош Норман?", "约什·诺曼拦截了多少球？",
             "Josh Norman 2015", "1234", "Kawann Short"]
    for a in texts:
        for b in texts:
            same_text = a == b
            differ = tags_differ(language_tag(a), language_tag(b))
            assert differ == different_languages(a, b) == _reference_rule(a, b)
            assert not (same_text and differ)
    assert different_languages(texts[1], texts[2]) and different_languages(texts[3], texts[4])
    assert not different_languages(texts[0], texts[5]) and not different_languages(texts[0], texts[6])
