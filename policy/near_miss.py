"""Rule-made edits of a question: near misses (the meaning changes) and surface rewrites (it does not).

A bi-encoder scores "convert a string to an int" and "convert an int to a string" at 0.99: a sentence
vector keeps the words, not their order, direction or negation. The pair verifier learns to see those
differences from labelled pairs, and labelled data has few of them, so training adds edits of its
*training* questions made by the rules below (never of benchmark questions):

- near misses (label 0): swapped direction ("from X to Y" -> "from Y to X", "convert X to Y" ->
  "convert Y to X"), negation added or removed ("with" <-> "without", "can" <-> "can't", "is" ->
  "is not"), antonyms ("best" <-> "worst", "increase" <-> "decrease", ...), a changed number or year,
  a changed named entity (a country, city, language, company, programming language);
- surface rewrites (label 1): contractions, "How do I" <-> "How can I", case and punctuation, and
  the swap of a *symmetric* pair ("difference between X and Y" -> "... Y and X"), so that the
  verifier does not learn "any edit is a near miss".

Every function is deterministic given its ``random.Random``.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

# Words whose swap reverses the meaning, both ways.
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("best", "worst"), ("increase", "decrease"), ("more", "less"), ("before", "after"), ("buy", "sell"),
    ("cheap", "expensive"), ("advantages", "disadvantages"), ("largest", "smallest"), ("biggest", "smallest"),
    ("start", "stop"), ("good", "bad"), ("hot", "cold"), ("male", "female"), ("men", "women"),
    ("win", "lose"), ("first", "last"), ("highest", "lowest"), ("high", "low"), ("fast", "slow"),
    ("faster", "slower"), ("long", "short"), ("old", "new"), ("easy", "hard"), ("easiest", "hardest"),
    ("rich", "poor"), ("gain", "lose"), ("import", "export"), ("upload", "download"), ("open", "close"),
    ("positive", "negative"), ("legal", "illegal"), ("safe", "dangerous"), ("true", "false"),
    ("love", "hate"), ("strong", "weak"), ("early", "late"), ("boy", "girl"), ("husband", "wife"),
    ("north", "south"), ("east", "west"), ("add", "remove"), ("enable", "disable"), ("encrypt", "decrypt"),
    ("maximum", "minimum"), ("inside", "outside"), ("above", "below"), ("young", "old"), ("happy", "sad"),
    ("success", "failure"), ("pros", "cons"), ("input", "output"), ("left", "right"), ("light", "heavy"),
)
# Interchangeable entities of one kind: replacing one by another changes the request.
ENTITIES: tuple[tuple[str, ...], ...] = (
    ("India", "China", "Pakistan", "USA", "Canada", "Germany", "France", "Japan", "Australia", "Brazil",
     "Russia", "Italy", "Spain", "Mexico", "UK", "Nigeria", "Indonesia", "Egypt"),
    ("London", "Paris", "New York", "Delhi", "Mumbai", "Tokyo", "Berlin", "Sydney", "Chicago", "Boston",
     "Bangalore", "Toronto", "Dubai", "Singapore", "Beijing", "Los Angeles", "San Francisco", "Madrid"),
    ("Python", "Java", "C++", "JavaScript", "Ruby", "PHP", "C#", "Swift", "Go", "Rust", "Kotlin", "Scala"),
    ("English", "Spanish", "French", "German", "Hindi", "Chinese", "Japanese", "Russian", "Arabic", "Italian"),
    ("Google", "Facebook", "Amazon", "Apple", "Microsoft", "Netflix", "Uber", "Twitter", "Quora", "IBM"),
    ("iPhone", "Android", "Windows", "Linux", "Mac"),
    ("Trump", "Clinton", "Obama", "Modi", "Putin"),
    ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
     "November", "December"),
    ("dog", "cat", "horse", "rabbit", "snake", "bird"),
    ("Bitcoin", "Ethereum", "gold", "silver"),
)
# (pattern, replacement) pairs that negate a question; applied one at a time.
NEGATIONS: tuple[tuple[str, str], ...] = (
    (r"\bwithout\b", "with"), (r"\bwith\b", "without"), (r"\bcan't\b", "can"), (r"\bcannot\b", "can"),
    (r"\bdon't\b", "do"), (r"\bdoesn't\b", "does"), (r"\bisn't\b", "is"),
    (r"\bshould not\b", "should"), (r"\bshould\b", "should not"), (r"^(Is|is) ", r"\1 not "),
    (r"\b(Why|why) (do|does|did|is|are|was|were) ", r"\1 \2 not "), (r"\bnever\b", "always"),
    (r"\balways\b", "never"), (r"\ballowed\b", "not allowed"), (r"\bpossible\b", "impossible"),
)
# Surface rewrites that keep the meaning.
SURFACE: tuple[tuple[str, str], ...] = (
    (r"\bWhat's\b", "What is"), (r"\bWhat is\b", "What's"), (r"\bHow do I\b", "How can I"),
    (r"\bHow can I\b", "How do I"), (r"\bHow do you\b", "How does one"), (r"\bWhich is\b", "What is"),
    (r"\bI'm\b", "I am"), (r"\bdon't\b", "do not"), (r"\bcan't\b", "cannot"), (r"\bit's\b", "it is"),
    (r"\bWhat are some\b", "What are"), (r"\bHow to\b", "How do I"), (r"\bIs it true that\b", "Is it the case that"),
    (r"\bwhat\b", "which"),
)
_STOP = {"in", "on", "for", "at", "by", "with", "without", "during", "using", "via", "and", "or", "if", "when",
         "while", "because", "so", "but", "than", "then", "from", "to", "into", "of", "without", "after", "before"}
_CONVERT_VERBS = {"convert", "change", "translate", "turn", "cast", "transfer", "move", "switch", "migrate", "go",
                  "travel", "fly", "drive", "send", "port", "upgrade", "downgrade"}
_TOKEN = re.compile(r"[\w#+.'-]+|[^\w\s]")
_SYMMETRIC = re.compile(r"\b(difference between|differences between|compare) ((?:[\w#+.'-]+ ){0,2}?[\w#+.'-]+) "
                        r"(and|with|vs\.?|versus) ((?:[\w#+.'-]+ ){0,2}?[\w#+.'-]+?)(?=[ ?.,!]|$)", re.I)
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def _phrase(tokens: list[str], start: int, limit: int = 4) -> int:
    """End (exclusive) of the noun phrase that starts at ``start``: up to ``limit`` word tokens, stopping
    at punctuation or a function word."""
    end = start
    while end < len(tokens) and end - start < limit and tokens[end].lower() not in _STOP and re.match(r"[\w#+]", tokens[end]):
        end += 1
    return end


def swap_direction(text: str, rng: random.Random) -> str | None:
    """"from X to Y" -> "from Y to X"; "convert X to Y" -> "convert Y to X" (articles move with
    their nouns: "convert a string to an int" -> "convert an int to a string")."""
    tokens = _TOKEN.findall(text)
    lower = [t.lower() for t in tokens]
    for i, tok in enumerate(lower):
        if tok == "from" or tok in _CONVERT_VERBS:
            a0 = i + 1
            a1 = _phrase(tokens, a0)
            if a1 == a0 or a1 >= len(tokens) or lower[a1] not in ("to", "into"):
                continue
            b0 = a1 + 1
            b1 = _phrase(tokens, b0)
            x, y = tokens[a0:a1], tokens[b0:b1]
            if not y or [t.lower() for t in x] == [t.lower() for t in y]:
                continue
            swapped = tokens[:a0] + y + tokens[a1:b0] + x + tokens[b1:]
            return _detokenize(swapped)
    return None


def _detokenize(tokens: list[str]) -> str:
    out = ""
    for t in tokens:
        out += t if (not out or re.match(r"[^\w\s#(]", t)) else " " + t
    return out


def _first_rewrite(text: str, rules: Sequence[tuple[str, str]], rng: random.Random) -> str | None:
    """The first of ``rules`` (in a random order) that changes ``text``, applied once."""
    rules = list(rules)
    rng.shuffle(rules)
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, text, count=1)
        if n and new != text:
            return new
    return None


def negate(text: str, rng: random.Random) -> str | None:
    return _first_rewrite(text, NEGATIONS, rng)


def _word_at(text: str, word: str) -> re.Match[str] | None:
    """The first use of ``word`` as a common word: lower case, or capitalised only as the first word
    (a capitalised word inside the sentence is a name: "New York")."""
    for m in re.finditer(rf"\b{re.escape(word)}\b", text, re.I):
        if m.group(0).islower() or m.start() == 0:
            return m
    return None


def antonym(text: str, rng: random.Random) -> str | None:
    found = [(a, b) for a, b in ANTONYMS if _word_at(text, a)] + [(b, a) for a, b in ANTONYMS if _word_at(text, b)]
    if not found:
        return None
    old, new = rng.choice(found)
    m = _word_at(text, old)
    assert m is not None
    repl = new.capitalize() if m.group(0)[:1].isupper() else new
    return text[: m.start()] + repl + text[m.end():]


def change_number(text: str, rng: random.Random) -> str | None:
    found = list(_NUMBER.finditer(text))
    if not found:
        return None
    m = rng.choice(found)
    value = m.group(0)
    if "." in value:
        new = f"{float(value) * rng.choice((2, 3, 0.5)):g}"
    else:
        n = int(value)
        if 1900 <= n <= 2100:  # a year
            new = str(n + rng.choice((-3, -2, -1, 1, 2, 3)))
        else:
            new = str(max(0, n + rng.choice((1, 2, 5, 10)) * rng.choice((-1, 1)) if n > 10 else n + rng.randint(1, 5)))
    if new == value:
        return None
    return text[: m.start()] + new + text[m.end():]


def change_entity(text: str, rng: random.Random) -> str | None:
    for group in rng.sample(ENTITIES, len(ENTITIES)):
        present = [e for e in group if re.search(rf"(?<![\w#+]){re.escape(e)}(?![\w#+])", text)]
        if present:
            old = rng.choice(present)
            new = rng.choice([e for e in group if e not in present])
            return re.sub(rf"(?<![\w#+]){re.escape(old)}(?![\w#+])", new, text, count=1)
    return None


def surface_rewrite(text: str, rng: random.Random) -> str | None:
    """A rewrite that keeps the meaning: symmetric swap, contraction, phrasing, case, punctuation."""
    m = _SYMMETRIC.search(text)
    if m and rng.random() < 0.7:
        return text[: m.start()] + f"{m.group(1)} {m.group(4)} {m.group(3)} {m.group(2)}" + text[m.end():]
    new = _first_rewrite(text, SURFACE, rng)
    if new is not None:
        return new
    options: list[Callable[[str], str]] = [
        lambda t: t.lower(), lambda t: t.rstrip("?!. ") if t.rstrip().endswith("?") else t + "?",
        lambda t: t[:1].lower() + t[1:], lambda t: t.replace("?", " ?"),
    ]
    new = rng.choice(options)(text)
    return new if new != text else None


NEAR_MISS_RULES: dict[str, Callable[[str, random.Random], str | None]] = {
    "direction": swap_direction,
    "negation": negate,
    "antonym": antonym,
    "number": change_number,
    "entity": change_entity,
}


def near_misses(text: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every near miss the rules can make of ``text``: ``[(kind, edited text)]``."""
    out = []
    for kind, rule in NEAR_MISS_RULES.items():
        edited = rule(text, rng)
        if edited and edited.strip() and edited.strip().lower() != text.strip().lower():
            out.append((kind, edited))
    return out


# ----- direction templates -----------------------------------------------------------------------------
# Few training questions carry a "from X to Y" or "convert X to Y" (measured: 46 of 6,000 sampled QQP
# questions), so the verifier did not learn that the order of the two ends matters. These templates make
# pairs where only the order changes (a near miss) next to a rewording with the same order (a paraphrase).
# Their vocabulary leaves out every pair of the hand-written test suite (tests/data/near_misses.jsonl).

_UNITS = (("meters", "feet"), ("kilograms", "pounds"), ("liters", "gallons"), ("inches", "centimeters"),
          ("hours", "minutes"), ("bytes", "bits"), ("ounces", "grams"), ("yards", "meters"), ("acres", "hectares"),
          ("Kelvin", "Celsius"), ("knots", "km/h"), ("cups", "milliliters"))
_FORMATS = (("JPG", "PNG"), ("MP4", "AVI"), ("Excel", "CSV"), ("JSON", "XML"), ("HTML", "Markdown"), ("EPUB", "MOBI"),
            ("a float", "an int"), ("a dict", "a list"), ("bytes", "a string"), ("a date", "a timestamp"),
            ("an array", "a set"), ("a char", "an int"), ("uppercase", "lowercase"), ("binary", "decimal"),
            ("hex", "decimal"), ("Python 2", "Python 3"), ("MySQL", "PostgreSQL"), ("SVN", "Git"))
_CURRENCIES = (("rupees", "dollars"), ("pounds", "euros"), ("yen", "dollars"), ("bitcoin", "dollars"),
               ("dollars", "pesos"), ("euros", "francs"))
_PLACES = (("Delhi", "Mumbai"), ("Chicago", "Boston"), ("Tokyo", "Osaka"), ("Madrid", "Barcelona"), ("Sydney", "Melbourne"),
           ("Toronto", "Vancouver"), ("Dubai", "Doha"), ("Rome", "Milan"), ("Seattle", "Portland"), ("Bangalore", "Chennai"),
           ("Lisbon", "Porto"), ("Munich", "Vienna"), ("India", "Canada"), ("Mexico", "Texas"), ("Earth", "Mars"))
_APPS = (("Gmail", "Outlook"), ("Dropbox", "Google Drive"), ("WhatsApp", "Telegram"), ("Windows", "Linux"),
         ("my phone", "my laptop"), ("my savings account", "my credit card"), ("Spotify", "Apple Music"),
         ("Instagram", "Facebook"), ("a USB drive", "my computer"), ("iCloud", "Google Photos"))
_ACTORS = (("lions", "zebras"), ("the teacher", "the student"), ("the company", "its employees"), ("Japan", "China"),
           ("the Sun", "Jupiter"), ("owls", "mice"), ("the buyer", "the seller"), ("parents", "children"),
           ("the landlord", "the tenant"), ("sharks", "dolphins"), ("India", "Pakistan"), ("the USA", "Russia"))


def direction_pairs(rng: random.Random, n: int) -> list[tuple[str, str, int]]:
    """``n`` labelled pairs ``(a, b, same)``: half direction swaps (0), half same-direction rewordings (1)."""
    makers = [
        lambda x, y: (f"How do I convert {x} to {y}?", f"How do I convert {y} to {x}?", f"What is the way to convert {x} into {y}?"),
        lambda x, y: (f"How many {x} are in one of the {y}?", f"How many {y} are in one of the {x}?", f"How many {x} make up one of the {y}?"),
        lambda x, y: (f"What is the exchange rate from {x} to {y}?", f"What is the exchange rate from {y} to {x}?", f"How many {y} do I get for my {x}?"),
        lambda x, y: (f"How long does it take to travel from {x} to {y}?", f"How long does it take to travel from {y} to {x}?", f"What is the travel time from {x} to {y}?"),
        lambda x, y: (f"What is the cheapest way to get from {x} to {y}?", f"What is the cheapest way to get from {y} to {x}?", f"How can I travel from {x} to {y} for the least money?"),
        lambda x, y: (f"How do I transfer my files from {x} to {y}?", f"How do I transfer my files from {y} to {x}?", f"How can I move my files from {x} over to {y}?"),
        lambda x, y: (f"How do I migrate from {x} to {y}?", f"How do I migrate from {y} to {x}?", f"What are the steps to switch from {x} to {y}?"),
        lambda x, y: (f"Why do {x} hunt {y}?", f"Why do {y} hunt {x}?", f"What is the reason {x} hunt {y}?"),
        lambda x, y: (f"How does {x} influence {y}?", f"How does {y} influence {x}?", f"In what ways does {x} influence {y}?"),
        lambda x, y: (f"Is {x} bigger than {y}?", f"Is {y} bigger than {x}?", f"Is {x} larger than {y}?"),
    ]
    vocab = [_UNITS + _FORMATS, _UNITS, _CURRENCIES, _PLACES, _PLACES, _APPS, _FORMATS + _APPS, _ACTORS, _ACTORS,
             _PLACES + _ACTORS]
    out: list[tuple[str, str, int]] = []
    while len(out) < n:
        k = rng.randrange(len(makers))
        x, y = rng.choice(vocab[k])
        if rng.random() < 0.5:
            x, y = y, x
        text, swapped, reworded = makers[k](x, y)
        out.append((text, swapped, 0) if len(out) % 2 == 0 else (text, reworded, 1))
    return out
