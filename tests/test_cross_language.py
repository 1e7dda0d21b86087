"""Across languages (#16): the language detector, and the proxy never serving a hit cached in another
language as is: it augments (C) by default, forwards or serves as configured. Real embedder, real
proxy, fake upstream, openai SDK."""

from __future__ import annotations

import httpx
import pytest

from tests.test_cache import ADMIN, ask, settle
from velo_proxy.language import detect, different_languages, script

QUESTIONS = {  # one question, hand-translated
    "en": "What is the capital city of Australia and why was it chosen?",
    "es": "¿Cuál es la capital de Australia y por qué fue elegida?",
    "de": "Was ist die Hauptstadt von Australien und warum wurde sie gewählt?",
    "fr": "Quelle est la capitale de l'Australie et pourquoi a-t-elle été choisie ?",
    "ru": "Какая столица Австралии и почему её выбрали?",
    "zh": "澳大利亚的首都是哪里，为什么选择它？",
    "ja": "オーストラリアの首都はどこで、なぜ選ばれたのですか？",
    "ko": "호주의 수도는 어디이며 왜 선택되었나요?",
}


@pytest.mark.parametrize("lang", sorted(QUESTIONS))
def test_detects_the_language_of_a_question(lang):
    assert detect(QUESTIONS[lang]) == lang


def test_different_only_when_it_can_tell():
    for a in QUESTIONS:
        for b in QUESTIONS:
            assert different_languages(QUESTIONS[a], QUESTIONS[b]) == (a != b), (a, b)
    # the same language, other questions: never "different"
    assert not different_languages("How do I convert a string to an integer?", "Is ibuprofen safe with alcohol?")
    assert not different_languages("¿Cómo se convierte una cadena en un entero?", "¿Dónde está la estación?")
    # too little to tell: an unknown Latin-script text is not "different" from English
    assert detect("Python 3.11?") is None and not different_languages("Python 3.11?", QUESTIONS["en"])
    # but a change of script is
    assert script("Python 3.11?") == "latin" and different_languages("Python 3.11?", QUESTIONS["ru"])
    # Latin names inside Chinese text keep it Chinese
    assert detect("Python 和 Java 的区别是什么？") == "zh"


def counter(proxy, action: str) -> float:
    text = httpx.get(f"{proxy.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(f'velo_cross_language_total{{action="{action}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("mode", ["augment", "forward", "serve"])
def test_a_hit_cached_in_another_language_is_not_served_as_is(make_proxy, embedder_dir, upstream_requests, mode):
    # threshold -1: the plain policy would serve any candidate, so only the language rule stands in the way
    proxy = make_proxy(policy="threshold", similarity_threshold=-1.0, admin_key=ADMIN, cross_language=mode)
    first, h1 = ask(proxy, QUESTIONS["en"])
    assert h1["x-velo-action"] == "B"
    settle(proxy)
    answer, h2 = ask(proxy, QUESTIONS["es"])
    sent = upstream_requests[-1]["body"]["messages"]
    if mode == "serve":
        assert h2["x-velo-action"] == "A" and answer.choices[0].message.content == first.choices[0].message.content
        assert len(upstream_requests) == 1
    elif mode == "augment":
        assert h2["x-velo-action"] == "C" and len(upstream_requests) == 2
        # the cached Q&A goes up as context, the user's own question last: the answer is a fresh one
        assert sent[-1]["content"] == QUESTIONS["es"]
        assert QUESTIONS["en"] in sent[0]["content"] and first.choices[0].message.content in sent[0]["content"]
        assert answer.choices[0].message.content != first.choices[0].message.content
    else:
        assert h2["x-velo-action"] == "B" and len(upstream_requests) == 2
        assert [m["content"] for m in sent] == [QUESTIONS["es"]]
    assert counter(proxy, mode) == (0.0 if mode == "serve" else 1.0)
    # within one language the same loose policy serves (the rule is about language, not similarity)
    settle(proxy)
    _, h3 = ask(proxy, "What is the capital of Australia, and why was that city chosen?")
    assert h3["x-velo-action"] == "A"


def test_the_learned_policy_reads_the_language_of_each_hit(make_proxy, tmp_path, upstream_requests):
    """Feature version 3 through the real proxy: the request's question and each cached question go through
    velo_proxy.language into the hit row's cross_language column. The probe actor augments (C) exactly when
    the top hit's column is 1, and forwards otherwise."""
    from tests.policy_builders import export_rule_policy

    path = export_rule_policy(tmp_path / "language.onnx", embedder_id="sentence-transformers/all-MiniLM-L6-v2",
                              version="rule-language", serve_above=0.5, on="cross_language", steer="C")
    proxy = make_proxy(policy="learned", policy_path=path, admin_key=ADMIN)
    _, h1 = ask(proxy, QUESTIONS["en"])
    assert h1["x-velo-action"] == "B"
    settle(proxy)
    _, h2 = ask(proxy, "What is the capital of Australia, and why was that city chosen?")
    assert h2["x-velo-action"] == "B"  # the same language: the column is 0
    settle(proxy)
    _, h3 = ask(proxy, QUESTIONS["de"])
    assert h3["x-velo-action"] == "C"  # German against English: 1
    sent = upstream_requests[-1]["body"]["messages"]
    assert sent[-1]["content"] == QUESTIONS["de"] and "Australia" in sent[0]["content"]
