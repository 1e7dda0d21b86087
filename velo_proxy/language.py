"""A cheap language detector (no model, no network) for one question: the script decides for the
non-Latin languages, common function words for the Latin-script ones.

Used to tell whether a request and a cached question are in the same language: a cached answer in
Spanish is not the answer to the same question asked in German, whatever the two embeddings say
(docs/multilingual.md, "Across languages"). The detector says ``None`` rather than guess: two
questions count as in different languages only when their scripts differ, or both are detected and differ.
"""

from __future__ import annotations

import re

# Script -> language, for the scripts that (nearly) name one language among those the proxy meets.
# Han without kana is Chinese; any kana makes it Japanese.
_SCRIPT_LANG = {"CYRILLIC": "ru", "HANGUL": "ko", "ARABIC": "ar", "HEBREW": "he", "GREEK": "el",
                "DEVANAGARI": "hi", "THAI": "th"}

# Frequent function words that are rare in the other listed languages (words shared between them,
# like "de", "la", "a", "in", "e", are left out: they would vote for the wrong one).
_WORDS = {
    "en": "the of and is are was were what which who how why when where does do did can could would should "
          "with without from this that these those have has been an it its to for on by than then there".split(),
    "es": "el los las del y es son qué cuál cuáles quién cómo por cuándo dónde cuánto cuántos una uno "
          "con sin para según pero también más está están fue fueron hay entre sobre".split(),
    "de": "der die das und ist sind war waren was welche welcher wer wie warum wann wo ein eine einen dem "
          "den des mit ohne von für auf nicht auch zu im wurde wurden gibt bei nach über".split(),
    "fr": "le les et est sont était qu'est quel quelle quels qui comment pourquoi quand où un une des du "
          "avec sans pour sur dans pas aussi au aux été ont il elle".split(),
    "it": "il gli della delle dei degli è sono che quale quali chi perché quando una uno con senza per "
          "sul nella anche non".split(),
    "pt": "os do da dos das é são que qual quais quem como porque quando onde um uma com sem para pelo "
          "pela não também foi".split(),
    "nl": "het een zijn waren wat welke wie hoe waarom wanneer waar met zonder van voor niet ook werd "
          "worden".split(),
}
_WORD_LANGS: dict[str, list[str]] = {}
for _lang, _words in _WORDS.items():
    for _w in dict.fromkeys(_words):
        _WORD_LANGS.setdefault(_w, []).append(_lang)
# letters that belong to one Latin-script language among those listed
_LETTERS = {"ñ": "es", "¿": "es", "¡": "es", "ß": "de", "ä": "de", "ö": "de", "ü": "de", "ç": "fr", "œ": "fr",
            "ã": "pt", "õ": "pt"}
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


# (first, last code point, script): a range test per letter, much cheaper than unicodedata.name
# (sorted: the search stops at the first range above the letter)
_RANGES = ((0x0041, 0x024F, "LATIN"), (0x0370, 0x03FF, "GREEK"), (0x0400, 0x052F, "CYRILLIC"),
           (0x0590, 0x05FF, "HEBREW"), (0x0600, 0x06FF, "ARABIC"), (0x0900, 0x097F, "DEVANAGARI"),
           (0x0E00, 0x0E7F, "THAI"), (0x1100, 0x11FF, "HANGUL"), (0x1E00, 0x1EFF, "LATIN"),
           (0x3040, 0x30FF, "KANA"), (0x3130, 0x318F, "HANGUL"), (0x3400, 0x4DBF, "HAN"),
           (0x4E00, 0x9FFF, "HAN"), (0xAC00, 0xD7AF, "HANGUL"), (0xF900, 0xFAFF, "HAN"),
           (0x20000, 0x2FA1F, "HAN"))


def _script(ch: str) -> str | None:
    o = ord(ch)
    for lo, hi, name in _RANGES:
        if o < lo:
            return None
        if o <= hi:
            return name
    return None


def script(text: str) -> str | None:
    """The writing system of ``text`` as a language code where the script names one (``zh``, ``ja``,
    ``ru``, ``ko``, ...), ``"latin"`` for Latin script, None without letters. A non-Latin script wins
    with a quarter of the letters: names and terms in Latin letters are common inside such text."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            s = _script(ch)
            if s is not None:
                counts[s] = counts.get(s, 0) + 1
    letters = sum(counts.values())
    if letters == 0:
        return None
    kana, han = counts.get("KANA", 0), counts.get("HAN", 0)
    if kana >= 1 and kana + han >= 0.25 * letters:
        return "ja"
    if han >= 0.25 * letters:
        return "zh"
    for name, lang in _SCRIPT_LANG.items():
        if counts.get(name, 0) >= 0.25 * letters:
            return lang
    return "latin"


def _latin_language(text: str) -> str | None:
    """The vote among the Latin-script languages (``text`` known to be in Latin script)."""
    votes = dict.fromkeys(_WORDS, 0.0)
    lower = text.lower()
    for tok in _TOKEN.findall(lower):
        langs = _WORD_LANGS.get(tok)
        if langs:
            for lang in langs:
                votes[lang] += 1.0 / len(langs)
    for ch, lang in _LETTERS.items():
        if ch in lower:
            votes[lang] += 1.0
    ranked = sorted(votes.items(), key=lambda kv: kv[1], reverse=True)
    (best, top), (_, second) = ranked[0], ranked[1]
    # one clear word is enough for a short question, but not a tie
    return best if top >= 1.0 and top > second else None


def detect(text: str) -> str | None:
    """ISO 639-1 code of ``text``'s language, or None when it cannot tell (no letters, or a Latin-script
    text without a clear vote among the languages it knows)."""
    s = script(text)
    return _latin_language(text) if s == "latin" else s


def language_tag(text: str) -> str | None:
    """What ``different_languages`` compares, for one text, computed once: the language code where it
    can tell (``detect``), ``"latin"`` for a Latin-script text it cannot place, None without letters.
    The policy's features and the simulator keep this tag per cached question (``tags_differ``)."""
    s = script(text)
    if s != "latin":
        return s
    return _latin_language(text) or "latin"


def tags_differ(a: str | None, b: str | None) -> bool:
    """``different_languages`` on two ``language_tag`` values."""
    if a is None or b is None or a == b:
        return False
    latin_a, latin_b = a == "latin" or a in _WORDS, b == "latin" or b in _WORDS
    if latin_a and latin_b:
        return a != "latin" and b != "latin"  # an undetected Latin-script text is never "different"
    return True  # two scripts, or two languages named by their scripts


def different_languages(a: str, b: str) -> bool:
    """True when the two texts are in different scripts, or both are detected and their languages
    differ. An undetected Latin-script text is never "different" from another Latin-script one."""
    return tags_differ(language_tag(a), language_tag(b))
