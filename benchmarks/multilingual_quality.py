"""Per-language cache quality, all-MiniLM-L6-v2 vs multilingual-e5-small (issue #16).

    python benchmarks/multilingual_quality.py [--pawsx-pairs 2000] [--e5-dir DIR] [--data-dir DIR] [--doc]
    python benchmarks/multilingual_quality.py --lrs [--doc]   # the learned policy shipped for each embedder

For each embedder, on streams shaped like benchmarks/quality.py's (clusters in random order, the first
arrival of each cluster a negative, the labelled near misses interleaved), with the plain cosine
threshold as the decision (the languages and embedders are compared on the same rule; the verified and the
learned policies have their own sections, ``--verified`` and ``--lrs``):

- **PAWS-X, per language** (de en es fr ja ko zh): each language's dev pairs are split in two halves by
  connected component; on the calibration half the threshold for δ is the smallest whose one-sided 95 %
  Wilson upper bound of the false-hit rate is ≤ δ (``velo_proxy.calibration``, as every calibration here);
  on the test half it is applied and measured: hit rate (share of duplicates answered from the cache),
  false-hit rate, and whether it held. Never a threshold picked on the test half.
- the same test halves at fixed thresholds (what a threshold means on each embedder's scale);
- **XQuAD across languages**, at fixed thresholds: one question in en/es/de/ru/zh is one cluster (890
  questions, 4,450 requests). A hit the threshold would serve in another language goes to C (``VELO_CROSS_LANGUAGE``):
  reported is the share of requests whose best hit is the same question in another language and that C
  takes with the right context (recall), and the share of C's contexts that are the same question
  (precision); a same-language hit is always wrong here (XQuAD has no paraphrases within a language).
- **XQuAD within one language**: each language's 890 questions alone (all different): false hits per
  1,000 requests at the fixed thresholds.

- **The learned policy per language** (``--lrs``): each embedder's shipped LRS (``SHIPPED_POLICIES``) with
  its verifier's scores and the language of each hit as features, on the PAWS-X test halves at its own
  calibrated thresholds, and on XQuAD across languages: which action it takes where its Eq. 4 entry is the
  same question in another language (the oracle's C) and where it is another question.

- **The English pair verifier per language** (``--verifier-only``): AUC of its score, paraphrase vs near
  miss, on each language's PAWS-X pairs (``--pawsx-pairs``), and in XQuAD of a question with its own
  translation vs with another question's translation: whether one verifier can serve every language.

Writes the tables to stdout and, with ``--doc``, into docs/multilingual.md between markers. Data:
``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data``. e5 is exported first if missing
(needs the ``multilingual`` extra).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from quality import (Replay, Workload, _from_pairs, _read_jsonl, _UnionFind, oracle_decider,  # noqa: E402
                     threshold_decider, write_section)

from velo_proxy.calibration import wilson_upper  # noqa: E402
from velo_proxy.language import different_languages  # noqa: E402

PAWS_LANGS = ("de", "en", "es", "fr", "ja", "ko", "zh")
XQ_LANGS = ("en", "es", "de", "ru", "zh")
DELTAS = (0.01, 0.02, 0.05)
GRID = [round(x, 4) for x in np.arange(0.5, 1.0 + 1e-9, 0.0025)]
FIXED = (0.8, 0.85, 0.9, 0.95)  # the XQuAD tables and the uncalibrated PAWS-X view: e5's cosines run higher


def split_by_component(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict], list[dict]]:
    """Two halves with no sentence in both: components of the pair graph (duplicates and near misses)."""
    uf = _UnionFind()
    for r in rows:
        uf.union(r["q1"].strip(), r["q2"].strip())
    cal, test = [], []
    for r in rows:
        h = zlib.crc32(f"{seed}:{uf.find(r['q1'].strip())}".encode())
        (cal if h % 2 == 0 else test).append(r)
    return cal, test


def curve(w: Workload) -> list[dict[str, float]]:
    rp = Replay(w.emb, w.cluster)
    pos = w.positives_mask()
    out = []
    for t in GRID:
        m = rp.run(threshold_decider(t), need=1).metrics(pos, w)
        m["threshold"] = t
        out.append(m)
    return out


def calibrated(points: list[dict[str, float]], delta: float) -> float | None:
    """Smallest threshold (most serving) whose Wilson upper bound of the false-hit rate is <= delta."""
    ok = [p for p in points if p["hits"] > 0 and wilson_upper(p["false"], p["hits"]) <= delta]
    return min(p["threshold"] for p in ok) if ok else None


def at(points: list[dict[str, float]], t: float | None) -> dict[str, float] | None:
    if t is None:
        return None
    return min(points, key=lambda p: abs(p["threshold"] - t))


def xquad_workloads(rows: list[dict[str, Any]], seed: int) -> tuple[Workload, dict[str, Workload]]:
    items: dict[str, tuple[int, str]] = {}
    for ci, r in enumerate(rows):
        for lang in XQ_LANGS:
            q = (r.get(f"question_{lang}") or "").strip()
            if q and q not in items:
                items[q] = (ci, lang)
    texts = list(items)
    random.Random(seed).shuffle(texts)
    across = Workload("xquad-across", "XQuAD, 5 languages", texts, np.array([items[t][0] for t in texts]),
                      [items[t][1] for t in texts])
    within = {}
    for lang in XQ_LANGS:
        qs = [t for t in texts if items[t][1] == lang]
        within[lang] = Workload(f"xquad-{lang}", f"XQuAD {lang}", qs, np.arange(len(qs)), [lang] * len(qs))
    return across, within


def across_languages(w: Workload, t: float) -> dict[str, float]:
    """The threshold at t with the cross-language rule: a hit in another language goes to C."""
    rp = Replay(w.emb, w.cluster)
    served_same = served_same_wrong = c_taken = c_right = 0
    inserted = np.zeros(w.n, dtype=bool)
    count = 0
    reachable = 0  # requests whose best cached candidate is the same question in another language
    for i in range(w.n):
        cands = rp.candidates(i, inserted, count, 5, 1) if count else []
        if cands and w.cluster[cands[0][0]] == w.cluster[i]:
            reachable += 1
        if cands and cands[0][1] >= t:
            j = cands[0][0]
            if different_languages(w.texts[i], w.texts[j]):
                c_taken += 1
                c_right += int(w.cluster[j] == w.cluster[i])
            else:
                served_same += 1
                served_same_wrong += int(w.cluster[j] != w.cluster[i])
        # A serves nothing new; B and C both store the answer under the request's own question
        if not (cands and cands[0][1] >= t and not different_languages(w.texts[i], w.texts[cands[0][0]])):
            inserted[i] = True
            count += 1
    return {"threshold": t, "requests": w.n, "reachable": reachable, "c_taken": c_taken, "c_right": c_right,
            "c_recall": c_right / reachable if reachable else float("nan"),
            "c_precision": c_right / c_taken if c_taken else float("nan"),
            "served_same_language": served_same, "served_same_language_wrong": served_same_wrong}


def run(embedder: Any, label: str, data: Path, pawsx_pairs: int, seed: int) -> dict[str, Any]:
    cache = common.EmbeddingCache(embedder)
    out: dict[str, Any] = {"embedder": embedder.id, "pawsx": {}, "xquad_within": {}}
    for lang in PAWS_LANGS:
        rows = _read_jsonl(data / "pairs" / f"paws-x-dev-{lang}.jsonl")
        rows = random.Random(seed).sample(rows, min(pawsx_pairs, len(rows)))
        cal_rows, test_rows = split_by_component(rows, seed)
        cal = _from_pairs(f"paws-x-{lang}-cal", "", cal_rows, seed)
        test = _from_pairs(f"paws-x-{lang}-test", "", test_rows, seed)
        cal.emb = cache.get(cal.texts, progress=f"{label} {lang} cal")
        test.emb = cache.get(test.texts, progress=f"{label} {lang} test")
        cc, tc = curve(cal), curve(test)
        res = {"cal_requests": cal.n, "test_requests": test.n, "test_positives": int(test.positives_mask().sum()),
               "oracle_hit_rate": Replay(test.emb, test.cluster).run(oracle_decider(test.cluster)).metrics(
                   test.positives_mask(), test)["hit_rate"], "deltas": {}}
        res["fixed"] = {str(t): {k: at(tc, t)[k] for k in ("hit_rate", "fhr", "hits")} for t in FIXED}
        for d in DELTAS:
            t = calibrated(cc, d)
            p = at(tc, t)
            res["deltas"][str(d)] = None if p is None else {
                "threshold": t, "hit_rate": p["hit_rate"], "fhr": p["fhr"], "hits": p["hits"], "false": p["false"],
                "held": p["fhr"] <= d}
        out["pawsx"][lang] = res
        print(f"[{label}] paws-x {lang}: " + ", ".join(
            f"δ={d}: " + ("none" if v is None else f"t={v['threshold']:.4f} hit {v['hit_rate']:.3f} FHR {v['fhr']:.3f}")
            for d, v in res["deltas"].items()), file=sys.stderr, flush=True)
    xrows = _read_jsonl(data / "qa" / "xquad-parallel-dev.jsonl")
    across, within = xquad_workloads(xrows, seed)
    across.emb = cache.get(across.texts, progress=f"{label} xquad")
    pos_of = {t: i for i, t in enumerate(across.texts)}
    out["xquad_across"] = {str(t): across_languages(across, t) for t in FIXED}
    for lang, w in within.items():
        w.emb = across.emb[[pos_of[t] for t in w.texts]]
        rp, pos = Replay(w.emb, w.cluster), w.positives_mask()
        out["xquad_within"][lang] = {str(t): 1000 * rp.run(threshold_decider(t), need=1).metrics(pos, w)["false"] / w.n
                                     for t in FIXED}
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive outscores a negative), ties half."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    allv = np.concatenate([pos, neg])
    ranks = np.empty(len(allv))
    ranks[np.argsort(allv, kind="mergesort")] = np.arange(1, len(allv) + 1)
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]  # ties share their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def verifier_by_language(data: Path, pairs_per_lang: int, seed: int, threads: int) -> str:
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    v = PairVerifier(Settings(verifier="pair-verifier").verifier_dir, threads=threads)
    L = [f"The shipped pair verifier (`{v.id}`, English-trained) per language: AUC of its score, paraphrase vs near "
         f"miss (PAWS-X dev, {pairs_per_lang} pairs per language), and its mean score (`python "
         f"benchmarks/multilingual_quality.py --verifier-only --pawsx-pairs {pairs_per_lang}`).\n",
         "| language | pairs | AUC | mean score, paraphrases | mean score, near misses |", "|---|---:|---:|---:|---:|"]
    for lang in PAWS_LANGS:
        rows = random.Random(seed).sample(_read_jsonl(data / "pairs" / f"paws-x-dev-{lang}.jsonl"), pairs_per_lang)
        sc = v.score_many([r["q1"] for r in rows], [r["q2"] for r in rows])
        dup = np.array([int(r["duplicate"]) for r in rows], dtype=bool)
        L.append(f"| {lang} | {len(rows)} | {auc(sc[dup], sc[~dup]):.3f} | {sc[dup].mean():.3f} | {sc[~dup].mean():.3f} |")
    xrows = _read_jsonl(data / "qa" / "xquad-parallel-dev.jsonl")[:pairs_per_lang]
    L.append("\nXQuAD: an English question against its own translation (same request) and against the next row's "
             "translation (another request about the same article, mostly):\n")
    L.append("| translation | pairs | AUC | mean score, own | mean score, other |")
    L.append("|---|---:|---:|---:|---:|")
    for lang in XQ_LANGS[1:]:
        en = [r["question_en"] for r in xrows]
        own = v.score_many(en, [r[f"question_{lang}"] for r in xrows])
        other = v.score_many(en, [xrows[(i + 1) % len(xrows)][f"question_{lang}"] for i in range(len(xrows))])
        L.append(f"| en–{lang} | {len(xrows)} | {auc(own, other):.3f} | {own.mean():.3f} | {other.mean():.3f} |")
    return "\n".join(L)


LRS_DELTAS = (0.02, 0.05, 0.1)


def lrs_by_language(embedders: dict[str, Any], data: Path, pawsx_pairs: int, seed: int, threads: int) -> dict[str, Any]:
    """The learned policy the package ships for each embedder (``velo_proxy.policy.SHIPPED_POLICIES``), run as
    the proxy runs it (its hits verified by the learned policy's verifier with that embedder's calibration
    block, the scores and the language of each hit as features), on real multilingual streams:

    - PAWS-X per language: the test halves of ``run`` (same split), at the actor's own P(A) thresholds for
      each δ (calibrated in the simulator, stored in the policy), plus the action mix on the requests whose
      best hit is a labelled paraphrase;
    - XQuAD across languages: for each request the Eq. 4 entry's relation to it (the same question in
      another language — the oracle's C —, another question in another language, another question in the
      same language) against the action the actor takes (A at δ's τ, else the likelier of B and C)."""
    from quality import LrsReplay, load_lrs, pair_scorer

    from velo_proxy import features as F
    from velo_proxy.calibration import serving_actions
    from velo_proxy.language import language_tag, tags_differ
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    def mix(lr: LrsReplay, w: Workload, tau: float, relation: Callable[[int, int], str | None]) -> dict[str, Any]:
        """Run the actor at A-threshold ``tau`` over ``w``; count its actions by ``relation(request, entry)``."""
        counts: dict[str, dict[str, int]] = {}

        def decide(i: int, cands: list[tuple[int, float]], st: Any) -> int | None:
            action = F.ACTIONS[int(serving_actions(np.array([lr.probs(i, cands, st)]), tau)[0])]  # the proxy's rule
            j = lr.entry(cands, st)
            j = cands[0][0] if j is None else j
            rel = relation(i, j)
            if rel is not None:
                row = counts.setdefault(rel, {"A": 0, "B": 0, "C": 0})
                row[action] += 1
            return j if action == "A" else None

        m = Replay(w.emb, w.cluster).run(decide).metrics(w.positives_mask(), w)
        return {"hit_rate": m["hit_rate"], "fhr": m["fhr"], "hits": m["hits"], "false": m["false"], "actions": counts}

    out: dict[str, Any] = {}
    for label, embedder in embedders.items():
        verifier = PairVerifier(Settings(policy="learned").verifier_dir, threads=threads, embedder_id=embedder.id)
        policies = {d: load_lrs(embedder, d, verifier) for d in LRS_DELTAS}
        if policies[LRS_DELTAS[0]] is None:
            out[label] = {"embedder": embedder.id, "error": "the package ships no learned policy for this embedder"}
            continue
        taus = {str(d): policies[d].threshold for d in LRS_DELTAS}
        res: dict[str, Any] = {"embedder": embedder.id, "policy": policies[LRS_DELTAS[0]].version, "taus": taus,
                               "reward_tau": policies[LRS_DELTAS[0]].calibration.get("reward_threshold"),
                               "pawsx": {}, "xquad_across": {}}
        cache = common.EmbeddingCache(embedder)
        for lang in PAWS_LANGS:
            rows = _read_jsonl(data / "pairs" / f"paws-x-dev-{lang}.jsonl")
            rows = random.Random(seed).sample(rows, min(pawsx_pairs, len(rows)))
            test = _from_pairs(f"paws-x-{lang}-test", "", split_by_component(rows, seed)[1], seed)
            test.emb = cache.get(test.texts, progress=f"{label} {lang} test")
            lr = LrsReplay(policies[LRS_DELTAS[0]], test.emb, pair_scorer(test, verifier),
                           languages=[language_tag(t) for t in test.texts])
            same = lambda i, j, w=test: "paraphrase" if w.cluster[i] == w.cluster[j] else "other"  # noqa: E731
            res["pawsx"][lang] = {"test_positives": int(test.positives_mask().sum()),
                                  **{key: mix(lr, test, tau, same) for key, tau in
                                     [*taus.items(), ("reward", res["reward_tau"])] if tau is not None and tau <= 1.0}}
            print(f"[{label} LRS] paws-x {lang}: " + ", ".join(f"{k}: hit {v['hit_rate']:.3f} FHR {v['fhr']:.3f}"
                                                              for k, v in res["pawsx"][lang].items() if isinstance(v, dict)),
                  file=sys.stderr, flush=True)
        across, _ = xquad_workloads(_read_jsonl(data / "qa" / "xquad-parallel-dev.jsonl"), seed)
        across.emb = cache.get(across.texts, progress=f"{label} xquad")
        tags = [language_tag(t) for t in across.texts]
        lr = LrsReplay(policies[LRS_DELTAS[0]], across.emb, pair_scorer(across, verifier), languages=tags)

        def relation(i: int, j: int, w: Workload = across) -> str:
            other = "another language" if tags_differ(tags[i], tags[j]) else "the same language"
            return ("same question, " if w.cluster[i] == w.cluster[j] else "another question, ") + other

        for key, tau in [("0.02", taus["0.02"]), ("reward", res["reward_tau"])]:  # the default δ and the most serving
            if tau is not None:
                res["xquad_across"][key] = mix(lr, across, min(tau, 1.01), relation)
        print(f"[{label} LRS] xquad across: {res['xquad_across']}", file=sys.stderr, flush=True)
        out[label] = res
    return out


def lrs_markdown(results: dict[str, Any], command: str, seconds: float) -> str:
    L = [f"The learned policy each embedder ships with, on real multilingual streams (`{command}`, {seconds / 60:.0f} "
         "min): its hits verified by the learned policy's verifier with that embedder's calibration block, the "
         "scores and the language of each hit as features, A at the actor's own calibrated P(A) threshold for δ "
         "(a δ without a threshold serves nothing), else the likelier of B and C; \"reward τ\" is the threshold "
         "that maximised the simulator's reward (no bound).\n"]
    for label, res in results.items():
        if "error" in res:
            L.append(f"- {label} (`{res['embedder']}`): {res['error']}.")
    L.append("PAWS-X test halves (the same split as the threshold tables at the end of this page): hit rate = share of paraphrase requests "
             "answered from the cache; FHR = wrong share of the cache's answers; then what the actor did with "
             "requests whose Eq. 4 entry was a labelled paraphrase, at the reward τ (A / C / B).\n")
    L.append("| embedder (policy) | language | paraphrase requests | δ = 2 %: hit / FHR | δ = 10 %: hit / FHR "
             "| reward τ: hit / FHR | paraphrase entry at reward τ: A / C / B |")
    L.append("|---|---|---:|---:|---:|---:|---:|")

    def pt(v: dict | None) -> str:
        if v is None or v["hits"] == 0:
            return "serves nothing"
        return f"{100 * v['hit_rate']:.1f} % / {100 * v['fhr']:.1f} %"

    for label, res in results.items():
        if "error" in res:
            continue
        for lang, r in res["pawsx"].items():
            para = (r.get("reward") or {}).get("actions", {}).get("paraphrase", {"A": 0, "B": 0, "C": 0})
            L.append(f"| {label} (`{res['policy']}`) | {lang} | {r['test_positives']} | {pt(r.get('0.02'))} | "
                     f"{pt(r.get('0.1'))} | {pt(r.get('reward'))} | {para['A']} / {para['C']} / {para['B']} |")
    L.append("\nXQuAD across languages (890 questions × 5 languages, one cluster per question): what the actor did, "
             "by the relation of the Eq. 4 entry to the request. The oracle's move for \"same question, another "
             "language\" is C (the cached Q&A grounds an answer in the user's language), for the rest B.\n")
    L.append("| embedder (policy) | A-threshold | Eq. 4 entry | requests | A | C | B |")
    L.append("|---|---|---|---:|---:|---:|---:|")
    for label, res in results.items():
        if "error" in res:
            continue
        for key, r in res["xquad_across"].items():
            name = "reward τ" if key == "reward" else f"δ = {float(key) * 100:g} %"
            for rel in sorted(r["actions"]):
                c = r["actions"][rel]
                n = sum(c.values())
                L.append(f"| {label} (`{res['policy']}`) | {name} | {rel} | {n} | {100 * c['A'] / n:.1f} % | "
                         f"{100 * c['C'] / n:.1f} % | {100 * c['B'] / n:.1f} % |")
    return "\n".join(L)


VERIFIED_DELTAS = (0.02, 0.05, 0.1)


def _replay_metrics(prep: Any, *, floor: float, top_k: int, threshold: float | None) -> dict[str, Any] | None:
    from policy import verifier_calibrate as VC

    if threshold is None:
        return None
    r = VC.replay(prep, _rule(floor, top_k, threshold))
    # PAWS-X labels only the pairs in its rows: a hit on another cluster with no label between the two is
    # often a paraphrase (a sentence's other rows fell in another part), so the false-hit rate is given as a
    # range, from the hits on labelled "not paraphrase" pairs (lower) to every other-cluster hit (upper)
    return {"threshold": float(threshold), "hits": r["hits"], "correct": r["correct"], "false": r["false"],
            "false_labelled": r["labelled_wrong"], "positives": r["positives"], "hit_rate": r["hit_rate"],
            "fhr": r["fhr"], "fhr_labelled": r["labelled_wrong"] / r["hits"] if r["hits"] else 0.0,
            "upper_bound": VC.upper_bound(r["false"], r["hits"]) if r["hits"] else None}


def translation_linked(rows: list[dict[str, Any]], en_rows: list[dict[str, Any]], idx: set[int]) -> list[dict[str, Any]]:
    """The rows ``idx`` of one PAWS-X language, plus a "paraphrase" link between the different translations of one
    English sentence: PAWS-X translated each row on its own, so a sentence that occurs in several rows has several
    translations, which are paraphrases of each other but no row says so (counted as false hits otherwise)."""
    by_source: dict[str, set[str]] = {}
    for i in idx:
        for key in ("q1", "q2"):
            by_source.setdefault(en_rows[i][key].strip(), set()).add(rows[i][key].strip())
    links = [{"q1": a, "q2": b, "duplicate": 1} for texts in by_source.values()
             for a, b in zip(sorted(texts), sorted(texts)[1:])]
    return [rows[i] for i in sorted(idx)] + links


def verified_by_language(embedders: dict[str, Any], data: Path, seed: int, threads: int) -> dict[str, Any]:
    """The verified policy per language: the default (multilingual) pair verifier with the calibration block of
    each embedder, on stream-shaped PAWS-X workloads per language. The rows are split as the verifier's own
    training split (``policy.verifier_multilingual.pawsx_split``: its ``train`` rows were trained on and are
    left out): thresholds are calibrated on each language's ``calibration`` rows (per language, and pooled over
    the seven with every language held to delta, as the card pools its English workloads) and measured on the
    ``heldout`` rows, next to the card's own thresholds (calibrated on English streams). XQuAD within one
    language (every hit wrong: no paraphrases) adds Russian, which PAWS-X lacks."""
    from policy import verifier_calibrate as VC
    from policy.verifier_multilingual import MultilingualConfig, pawsx_split
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    split = pawsx_split(MultilingualConfig())
    en_rows = _read_jsonl(data / "pairs" / "paws-x-dev-en.jsonl")
    xrows = _read_jsonl(data / "qa" / "xquad-parallel-dev.jsonl")
    out: dict[str, Any] = {"split_rows": {k: len(v) for k, v in split.items()}, "embedders": {}}
    for label, embedder in embedders.items():
        t0 = time.time()
        v = PairVerifier(Settings().verifier_dir, threads=threads, embedder_id=embedder.id)
        floor, top_k = float(v.calibration["cosine_floor"]), int(v.calibration["top_k"])
        card = {str(float(k)): float(t) for k, t in v.calibration["thresholds"].items()}
        cache = common.EmbeddingCache(embedder)
        prepared: dict[str, dict[str, Any]] = {}
        for lang in PAWS_LANGS:
            rows = _read_jsonl(data / "pairs" / f"paws-x-dev-{lang}.jsonl")
            prepared[lang] = {}
            for part in ("calibration", "heldout"):
                w = _from_pairs(f"paws-x-{lang}-{part}", "", translation_linked(rows, en_rows, split[part]), seed)
                emb = cache.get(w.texts, progress=f"{label} {lang} {part}")
                prepared[lang][part] = VC.prepare(w.name, w.texts, w.cluster, emb, v, floor=floor, m=5,
                                                  neg_edges=w.neg_edges, progress=True)
        cal = [prepared[lang]["calibration"] for lang in PAWS_LANGS]
        grid = VC.threshold_grid(cal, steps=120)  # from the calibration rows only
        pooled = VC.choose_thresholds(VC.sweep(cal, floor=floor, top_k=top_k, thresholds=grid), VERIFIED_DELTAS)
        res: dict[str, Any] = {"verifier": v.id, "precision": v.metadata.get("precision"), "cosine_floor": floor,
                               "top_k": top_k, "card_thresholds": card,
                               "pooled_thresholds": {d: (r["threshold"] if r else None) for d, r in pooled.items()},
                               "pawsx": {}, "xquad_within": {}}
        for lang in PAWS_LANGS:
            c, h = prepared[lang]["calibration"], prepared[lang]["heldout"]
            own = VC.choose_thresholds(VC.sweep([c], floor=floor, top_k=top_k,
                                                thresholds=VC.threshold_grid([c], steps=120)), VERIFIED_DELTAS)
            never = _rule(floor, top_k, 2.0)  # serves nothing: counts the positives
            row: dict[str, Any] = {"cal_positives": VC.replay(c, never)["positives"],
                                   "heldout_positives": VC.replay(h, never)["positives"],
                                   "card": {}, "per_language": {}, "pooled": {}}
            for d in VERIFIED_DELTAS:
                key = str(d)
                row["card"][key] = _replay_metrics(h, floor=floor, top_k=top_k, threshold=card.get(key))
                row["per_language"][key] = _replay_metrics(h, floor=floor, top_k=top_k,
                                                           threshold=own[key]["threshold"] if own[key] else None)
                row["pooled"][key] = _replay_metrics(h, floor=floor, top_k=top_k, threshold=res["pooled_thresholds"][key])
            res["pawsx"][lang] = row
            print(f"[{label} + verifier] paws-x {lang}: " + "; ".join(
                f"{kind} δ={d}: " + ("none" if row[kind][str(d)] is None else
                                     f"{row[kind][str(d)]['hit_rate']:.3f} hit, {row[kind][str(d)]['fhr']:.3f} FHR")
                for kind in ("card", "per_language") for d in VERIFIED_DELTAS), file=sys.stderr, flush=True)
        across, within = xquad_workloads(xrows, seed)
        across.emb = cache.get(across.texts, progress=f"{label} xquad")
        pos_of = {t: i for i, t in enumerate(across.texts)}
        for lang, w in within.items():
            prep = VC.prepare(w.name, w.texts, w.cluster, across.emb[[pos_of[t] for t in w.texts]], v, floor=floor,
                              m=5, progress=False)
            res["xquad_within"][lang] = {"requests": w.n, **{
                f"{kind} δ={d}": (None if t is None else 1000 * VC.replay(prep, _rule(floor, top_k, t))["false"] / w.n)
                for kind, ts in (("card", card), ("pooled", res["pooled_thresholds"]))
                for d in VERIFIED_DELTAS for t in [ts.get(str(d))]}}
        res["seconds"] = round(time.time() - t0, 1)
        out["embedders"][label] = res
    return out


def _rule(floor: float, top_k: int, threshold: float) -> Any:
    from velo_proxy.verifier import VerifyRule

    return VerifyRule(cosine_floor=floor, top_k=top_k, threshold=float(threshold))


def verified_markdown(res: dict[str, Any], command: str, seconds: float) -> str:
    def cell(m: dict[str, Any] | None, d: float) -> str:
        if m is None:
            return "—"
        mark = "" if m["fhr"] <= d else (" ✗" if m["fhr_labelled"] > d else " ?")
        return (f"{m['threshold']:.3f}: {100 * m['hit_rate']:.1f} % / {100 * m['fhr_labelled']:.1f}–"
                f"{100 * m['fhr']:.1f} %{mark}")

    L = [f"Measured by `{command}` ({seconds / 60:.1f} min; {common.machine_info().get('cpu', '')}). The default "
         "pair verifier per language, with each embedder's calibration block (cosine floor, top-k). PAWS-X dev rows "
         f"as the verifier's own training split ({res['split_rows']['train']} rows per language trained on, left "
         f"out; {res['split_rows']['calibration']} calibration rows; {res['split_rows']['heldout']} held-out rows "
         "measured here), each part a stream (clusters in random order, near misses interleaved). Cells: score "
         "threshold: hit rate / false-hit rate on the held-out rows, as a range: from the hits on pairs PAWS-X "
         "labels \"not paraphrase\" to every hit on another cluster (PAWS-X labels only the pairs in its rows, and "
         "an unlabelled pair of this subset is often a paraphrase; the different translations of one English "
         "sentence are joined as paraphrases). ✗: even the lower end is above δ; ?: only "
         "the upper end is; —: no threshold holds δ on the calibration rows (held to the upper end). *card*: "
         "the shipped card's thresholds (calibrated on English streams); *per language*: calibrated on that "
         "language's calibration rows (one-sided 95 % Clopper-Pearson bound ≤ δ); *pooled*: one threshold for the "
         "seven languages, each held to δ on its calibration rows.\n"]
    for label, r in res["embedders"].items():
        L.append(f"**{label} retrieval + `{r['verifier']}` ({r['precision']})**, cosine floor {r['cosine_floor']:.4f}, "
                 f"top-{r['top_k']} verified; pooled thresholds: " + ", ".join(
                     f"δ={d}: {'none' if t is None else f'{t:.3f}'}" for d, t in r["pooled_thresholds"].items()) + ".\n")
        head = ["language", "held-out positives"]
        head += [f"{kind} δ={d:g}" for kind in ("card", "per language", "pooled") for d in VERIFIED_DELTAS
                 if not (kind == "card" and str(d) not in r["card_thresholds"])]
        L.append("| " + " | ".join(head) + " |")
        L.append("|---|---:|" + "---|" * (len(head) - 2))
        for lang in PAWS_LANGS:
            row = r["pawsx"][lang]
            cells = [lang, str(row["heldout_positives"])]
            for kind, key in (("card", "card"), ("per language", "per_language"), ("pooled", "pooled")):
                for d in VERIFIED_DELTAS:
                    if kind == "card" and str(d) not in r["card_thresholds"]:
                        continue
                    cells.append(cell(row[key][str(d)], d))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        keys = [k for k in next(iter(r["xquad_within"].values())) if k != "requests"]
        keys = [k for k in keys if any(x[k] is not None for x in r["xquad_within"].values())]
        if keys:
            L.append(f"XQuAD within one language ({label} retrieval; every hit wrong): false hits per 1,000 requests.\n")
            L.append("| language | " + " | ".join(keys) + " |")
            L.append("|---|" + "---:|" * len(keys))
            for lang, x in r["xquad_within"].items():
                L.append(f"| {lang} | " + " | ".join("—" if x[k] is None else f"{x[k]:.1f}" for k in keys) + " |")
            L.append("")
    return "\n".join(L)


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    L = [f"Measured by `python benchmarks/multilingual_quality.py --pawsx-pairs {args.pawsx_pairs}` "
         f"({seconds / 60:.1f} min; {common.machine_info().get('cpu', '')}). Plain cosine threshold, calibrated per "
         "language on one half of its PAWS-X dev pairs (by component), measured on the other half.\n"]
    for d in DELTAS:
        L.append(f"**δ = {d:g}** — PAWS-X test half: hit rate / false-hit rate at the threshold calibrated on the "
                 "other half (✗: the bound did not hold on the test half; —: no threshold holds δ on the calibration half)\n")
        L.append("| language | " + " | ".join(f"{lab} threshold | {lab} hit | {lab} FHR" for lab in results) + " |")
        L.append("|---|" + "---:|---:|---:|" * len(results))
        for lang in PAWS_LANGS:
            cells = []
            for res in results.values():
                v = res["pawsx"][lang]["deltas"][str(d)]
                if v is None:
                    cells += ["—", "0 %", "—"]
                else:
                    cells += [f"{v['threshold']:.4f}", f"{100 * v['hit_rate']:.1f} %",
                              f"{100 * v['fhr']:.1f} %" + ("" if v["held"] else " ✗")]
            L.append(f"| {lang} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("Oracle (top-5) hit rate on each test half: " + "; ".join(
        f"{lab}: " + ", ".join(f"{lang} {100 * res['pawsx'][lang]['oracle_hit_rate']:.0f} %" for lang in PAWS_LANGS)
        for lab, res in results.items()) + ".\n")
    L.append("PAWS-X test half at fixed thresholds (not operating points: what each threshold means on each "
             "embedder's scale), hit rate / false-hit rate:\n")
    L.append("| language | " + " | ".join(f"{lab} {t:g}" for lab in results for t in FIXED) + " |")
    L.append("|---|" + "---:|" * (len(results) * len(FIXED)))
    for lang in PAWS_LANGS:
        cells = [f"{100 * r['pawsx'][lang]['fixed'][str(t)]['hit_rate']:.0f} / {100 * r['pawsx'][lang]['fixed'][str(t)]['fhr']:.0f} %"
                 for r in results.values() for t in FIXED]
        L.append(f"| {lang} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("**XQuAD across languages** (890 questions × 5 languages; a hit the threshold would serve in another "
             "language goes to C): of the requests whose best cached candidate is the same question in another "
             "language (reachable), the share C takes with that context (recall); of C's contexts, the share that "
             "are the same question (precision); same-language hits served (all wrong: XQuAD has no paraphrases "
             "within a language).\n")
    L.append("| embedder | threshold | reachable | C recall | C precision | same-language hits served |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for lab, res in results.items():
        for t, v in res["xquad_across"].items():
            L.append(f"| {lab} | {float(t):g} | {v['reachable']} | {100 * v['c_recall']:.1f} % | "
                     f"{100 * v['c_precision']:.1f} % | {v['served_same_language']} |")
    L.append("")
    L.append("**XQuAD within one language** (890 different questions each, so every hit is wrong): false hits per "
             "1,000 requests.\n")
    L.append("| embedder | threshold | " + " | ".join(XQ_LANGS) + " |")
    L.append("|---|---:|" + "---:|" * len(XQ_LANGS))
    for lab, res in results.items():
        for t in FIXED:
            L.append(f"| {lab} | {t:g} | " + " | ".join(f"{res['xquad_within'][lang][str(t)]:.1f}" for lang in XQ_LANGS) + " |")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pawsx-pairs", type=int, default=2000, help="pairs per language (PAWS-X dev has 2,000)")
    ap.add_argument("--e5-dir", type=Path, default=None, help="exported e5 (default: <models>/multilingual-e5-small)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per embedder")
    ap.add_argument("--doc", action="store_true", help="write the tables into docs/multilingual.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verifier-only", action="store_true", help="only the English verifier per language")
    ap.add_argument("--verified", action="store_true",
                    help="only the verified policy per language (the default verifier, calibrated per language)")
    ap.add_argument("--lrs", action="store_true",
                    help="only the learned policy shipped for each embedder, per language and across languages")
    a = ap.parse_args(argv)
    if a.data_dir is not None:
        import os

        os.environ["VELO_DATASETS_DIR"] = str(a.data_dir)
    data = common.require_data()
    if a.verifier_only:
        body = verifier_by_language(data, min(a.pawsx_pairs, 2000), a.seed, a.threads)
        print(body)
        if a.doc:
            write_section(common.REPO / "docs" / "multilingual.md", "multilingual-verifier", body)
        return 0
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings, default_home

    e5_dir = a.e5_dir or default_home() / "models" / "multilingual-e5-small"
    if not (e5_dir / "model.onnx").exists():
        from velo_proxy.e5_export import export_e5

        export_e5(e5_dir)
    t0 = time.time()
    embedders = {"MiniLM": OnnxEmbedder(Settings().embedder_dir, threads=a.threads),
                 "e5": OnnxEmbedder(e5_dir, threads=a.threads)}
    if a.lrs:
        command = "python benchmarks/multilingual_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results = lrs_by_language(embedders, data, a.pawsx_pairs, a.seed, a.threads)
        body, section = lrs_markdown(results, command.strip(), time.time() - t0), "multilingual-lrs"
    elif a.verified:
        command = "python benchmarks/multilingual_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results: Any = verified_by_language(embedders, data, a.seed, a.threads)
        body, section = verified_markdown(results, command.strip(), time.time() - t0), "multilingual-verified"
    else:
        results = {label: run(e, label, data, a.pawsx_pairs, a.seed) for label, e in embedders.items()}
        body, section = markdown(results, a, time.time() - t0), "multilingual-quality"
    print(body)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=float))
    if a.doc:
        write_section(common.REPO / "docs" / "multilingual.md", section, body)
    return 0

if __name__ == "__main__":
    sys.exit(main())
