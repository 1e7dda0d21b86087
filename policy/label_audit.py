"""Audit QQP's labels where they matter: the hits a verifier would serve (issue #12).

QQP labels only the pairs that were sampled, and not always right, so a stream-shaped workload counts a hit
on another cluster as wrong when it may be the same request. The calibration charges such a hit with the
wrong share a hand audit found (``policy/qqp_label_audit.jsonl``). The first audit sampled candidates by
cosine (>= 0.85), whatever a verifier thinks of them; but a verifier serves only the pairs it is confident
about, and those are the pairs where a missing or wrong "not duplicate" label is most likely. So this audit
samples the hits the verifier itself serves at score >= ``--min-score`` on the QQP calibration stream
(never a benchmark text), one population at a time (unlabelled, labelled "not duplicate"), and the
calibration charges hits in that score band with *that* band's wrong share (its one-sided 95 % upper bound).

    python -m policy.label_audit sample --verifier-dir DIR --min-score 0.9 --n 120 --out runs/audit
        # -> runs/audit/blind.tsv (id, new question, cached question; shuffled, no label, no score)
        #    runs/audit/key.json (what each id is)
    # a person (or an LLM judge) writes runs/audit/labels.tsv: "id<TAB>1" when the cached answer answers
    # the new question (the same request), "id<TAB>0" when it does not
    python -m policy.label_audit merge --out runs/audit      # appends the judged rows to the audit file

The judge sees neither the QQP label nor the verifier's score (``blind.tsv``), so the two populations are
judged by one standard.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from policy import data as D
from policy import verifier_calibrate as C
from policy import verifier_data as V


def served_cross_cluster(verifier, *, min_score: float, spec: V.VerifierDataSpec | None = None) -> list[dict]:
    """The hits ``verifier`` serves at ``min_score`` on the QQP calibration stream whose two questions are in
    different clusters (the hits a stream counts as false), with their population and score."""
    from velo_proxy.verifier import VerifyRule

    spec = spec or V.VerifierDataSpec()
    w = V.calibration_workloads(spec)[0]
    assert w.name == "qqp-calibration"
    emb, _ = D.embed_texts(w.texts, progress=True)
    cal = verifier.calibration
    floor, top_k = float(cal.get("cosine_floor", C.COSINE_FLOOR)), int(cal.get("top_k", C.TOP_K))
    prep = C.prepare(w.name, w.texts, w.cluster, emb, verifier, floor=floor, progress=True, neg_edges=w.neg_edges)
    r = C.replay(prep, VerifyRule(cosine_floor=floor, top_k=top_k, threshold=min_score))
    out = []
    cl = w.cluster.tolist()
    for i, j in enumerate(r["served"].tolist()):
        if j < 0 or cl[i] == cl[j]:
            continue
        k = prep.nbr[i].index(j)
        edge = (min(cl[i], cl[j]), max(cl[i], cl[j]))
        out.append({"population": "labelled_negative" if edge in w.neg_edges else "unlabelled",
                    "q1": w.texts[i], "q2": w.texts[j], "cosine": round(float(prep.sim[i][k]), 3),
                    "score": round(float(prep.score[i][k]), 4)})
    return out


def sample(args: argparse.Namespace) -> int:
    from velo_proxy.verifier import PairVerifier

    embedder = D.load_embedder()
    verifier = PairVerifier(args.verifier_dir, threads=2, embedder_id=embedder.id)
    hits = served_cross_cluster(verifier, min_score=args.min_score)
    rng = random.Random(args.seed)
    chosen = []
    for pop in ("unlabelled", "labelled_negative"):
        rows = [h for h in hits if h["population"] == pop]
        print(f"{pop}: {len(rows)} served cross-cluster hits at score >= {args.min_score}", file=sys.stderr)
        chosen += rng.sample(rows, min(args.n, len(rows)))
    rng.shuffle(chosen)
    # a pair judged before (for another verifier or the first audit) keeps its judgement: judged once
    judged = C.judged_pairs()
    for h in chosen:
        same = judged.get(tuple(sorted((h["q1"], h["q2"]))))
        if same is not None:
            h["same"] = same
    args.out.mkdir(parents=True, exist_ok=True)
    key = {"verifier": verifier.id, "embedder": embedder.id, "min_score": args.min_score, "seed": args.seed,
           "served_cross_cluster": {p: sum(h["population"] == p for h in hits) for p in ("unlabelled", "labelled_negative")},
           "rows": {f"a{n:04d}": h for n, h in enumerate(chosen)}}
    (args.out / "key.json").write_text(json.dumps(key, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(args.out / "blind.tsv", "w", encoding="utf-8") as fh:
        for rid, h in key["rows"].items():
            if "same" not in h:
                fh.write(f"{rid}\t{h['q1']}\t{h['q2']}\n")
    todo = sum("same" not in h for h in chosen)
    print(f"{todo} pairs to judge ({len(chosen) - todo} judged before): {args.out / 'blind.tsv'}", file=sys.stderr)
    return 0


def merge(args: argparse.Namespace) -> int:
    key = json.loads((args.out / "key.json").read_text(encoding="utf-8"))
    labels = {rid: int(h["same"]) for rid, h in key["rows"].items() if "same" in h}
    for line in (args.out / "labels.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rid, same = line.split("\t")[:2]
            labels[rid.strip()] = int(same)
    missing = sorted(set(key["rows"]) - set(labels))
    if missing:
        print(f"not judged: {missing[:5]}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
        return 2
    with open(args.audit_file, "a", encoding="utf-8") as fh:
        for rid, h in key["rows"].items():
            fh.write(json.dumps({"population": h["population"], "q1": h["q1"], "q2": h["q2"], "cosine": h["cosine"],
                                 "same": labels[rid], "verifier": key["verifier"], "band": key["min_score"],
                                 "score": h["score"]}, ensure_ascii=False) + "\n")
    for pop in ("unlabelled", "labelled_negative"):
        s = C.audit_share(population=pop, verifier=key["verifier"], band=key["min_score"], path=args.audit_file)
        print(f"{pop}: {s['wrong']} of {s['audited']} differ (upper bound {s['upper']:.3f})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="sample a verifier's served cross-cluster hits for judging")
    s.add_argument("--verifier-dir", type=Path, required=True)
    s.add_argument("--min-score", type=float, default=0.9)
    s.add_argument("--n", type=int, default=120, help="pairs per population")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=sample)
    m = sub.add_parser("merge", help="append the judged pairs to the audit file")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--audit-file", type=Path, default=C.AUDIT_FILE)
    m.set_defaults(func=merge)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
