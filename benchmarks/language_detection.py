"""How well ``velo_proxy.language`` tells languages apart (issue #16, across languages).

    python benchmarks/language_detection.py [--data-dir DIR] [--paws-pairs 1000] [--qqp-pairs 5000]

Prints markdown tables:

- XQuAD (890 questions, each in en/es/de/ru/zh): what ``detect`` says per language; for every pair of
  languages, the share of translation pairs called "different" (should be 100 %); within a language,
  the share of pairs of two different questions called "different" (should be 0 %);
- PAWS-X dev (7 languages) and QQP dev (English): the share of each file's own pairs (same language)
  called "different", and ``detect``'s answers on their first sentences;
- time per call.

A false "different" costs latency only (the hit is augmented instead of served, the answer stays right);
a missed one lets a cached answer in another language through, which the policy and the verifier then
have to catch. Data: ``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from velo_proxy.language import detect, different_languages  # noqa: E402

LANGS = ("en", "es", "de", "ru", "zh")
PAWS_LANGS = ("de", "en", "es", "fr", "ja", "ko", "zh")


def jsonl(path: Path, n: int | None = None) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--paws-pairs", type=int, default=1000)
    ap.add_argument("--qqp-pairs", type=int, default=5000)
    a = ap.parse_args(argv)
    if a.data_dir is not None:
        os.environ["VELO_DATASETS_DIR"] = str(a.data_dir)
    root = common.require_data()
    rows = jsonl(root / "qa" / "xquad-parallel-dev.jsonl")
    rng = random.Random(0)

    print(f"## XQuAD ({len(rows)} questions per language)\n")
    print("| language | detected as itself | undetected | detected as another (most common) |")
    print("|---|---:|---:|---|")
    for lang in LANGS:
        c = collections.Counter(detect(r[f"question_{lang}"]) for r in rows)
        other = [(k, v) for k, v in c.most_common() if k not in (lang, None)]
        print(f"| {lang} | {pct(c[lang] / len(rows))} | {pct(c[None] / len(rows))} | "
              + (", ".join(f"{k} {v}" for k, v in other[:3]) or "–") + " |")
    print("\n| pair | translations called different | two questions of one language called different |")
    print("|---|---:|---:|")
    for x, y in itertools.combinations(LANGS, 2):
        cross = sum(different_languages(r[f"question_{x}"], r[f"question_{y}"]) for r in rows) / len(rows)
        print(f"| {x}–{y} | {pct(cross)} | |")
    for lang in LANGS:
        qs = [r[f"question_{lang}"] for r in rows]
        same = sum(different_languages(q, qs[(i + 1 + rng.randrange(len(qs) - 1)) % len(qs)])
                   for i, q in enumerate(qs)) / len(qs)
        print(f"| {lang}–{lang} | | {pct(same)} |")

    print(f"\n## Pairs of one language (PAWS-X dev, first {a.paws_pairs} per language; QQP dev, first {a.qqp_pairs})\n")
    print("| file | pairs | called different | detect(q1) as itself | undetected |")
    print("|---|---:|---:|---:|---:|")
    texts = []
    sets = [(f"paws-x-dev-{lang}", lang, jsonl(root / "pairs" / f"paws-x-dev-{lang}.jsonl", a.paws_pairs))
            for lang in PAWS_LANGS]
    sets.append(("qqp-dev", "en", jsonl(root / "pairs" / "qqp-dev.jsonl", a.qqp_pairs)))
    for name, lang, pairs in sets:
        diff = sum(different_languages(p["q1"], p["q2"]) for p in pairs) / len(pairs)
        c = collections.Counter(detect(p["q1"]) for p in pairs)
        texts += [p["q1"] for p in pairs]
        print(f"| {name} | {len(pairs)} | {pct(diff)} | {pct(c[lang] / len(pairs))} | {pct(c[None] / len(pairs))} |")

    t0 = time.perf_counter()
    for t in texts:
        detect(t)
    us = (time.perf_counter() - t0) / len(texts) * 1e6
    print(f"\n`detect`: {us:.0f} µs per text (mean over {len(texts)} texts, one process).")


if __name__ == "__main__":
    main()
