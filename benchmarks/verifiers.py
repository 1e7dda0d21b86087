"""The shipped pair verifiers side by side on held-out stream-shaped workloads (issues #12 and #16).

    python benchmarks/verifiers.py            # ~30 min on 2 cores; rewrites the verifiers section of docs/benchmarks.md
    python benchmarks/verifiers.py --embedder multilingual-e5-small   # retrieval with e5 (its own section)
    python benchmarks/verifiers.py --tiny --no-doc    # smoke size (tests/data slices)

Which verifier should serve English traffic? The English one (all-MiniLM-L6-v2 cross-encoder, the learned
policy's) or the multilingual one (multilingual-e5-small cross-encoder, the default), and that one in fp32 or int8? Each is
measured the way ``benchmarks/quality.py`` measures the verified policy, on the same workloads (the same
texts left out: everything any verifier or the shipped LRS policy trains or is calibrated on), with the
same retrieval (MiniLM, or e5 with --embedder; top-5, the verifier's cosine floor for that embedder), at the thresholds its own card calibrated
for each delta: never a threshold picked on these streams. QQP cross-cluster hits are counted as in
quality.py: labelled wrong and unlabelled ones at the upper bounds of the label audit of the verifier's
own hits (``policy.label_audit``; docs/verifier.md, *Label noise*), or the first audit's below its band.
The static threshold 0.95 (the old default) and the oracle (top-5) are shown for scale.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import quality as Q  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "verifiers"


def load_verifiers(embedder_id: str, workdir: Path, *, threads: int) -> dict[str, Any]:
    """The English verifier as installed, and the multilingual one exported here in both precisions, each
    with its calibration for ``embedder_id``."""
    from velo_proxy.e5_verifier_export import export_e5_verifier
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    out = {}
    english = PairVerifier(Settings(verifier="pair-verifier").verifier_dir, threads=threads, embedder_id=embedder_id)
    if english.embedder_id == embedder_id:  # calibrated for MiniLM only: it has no rule for e5's similarities
        out[f"English (MiniLM) {english.metadata.get('precision')}"] = english
    for precision in ("fp32", "int8"):
        path = export_e5_verifier(workdir / f"e5-{precision}", precision=precision)
        out[f"multilingual (e5) {precision}"] = PairVerifier(path, threads=threads, embedder_id=embedder_id)
    return out


def speed(verifier: Any, w: Any, *, calls: int = 200, seed: int = 0) -> dict[str, float]:
    """One request's verification as the proxy makes it (a question against 3 cached ones, one onnxruntime
    call, one thread), on QQP questions of the workload: p50 / p90 in ms, after a warm-up."""
    import random

    import numpy as np

    rng = random.Random(seed)
    texts = w.texts
    reqs = [(texts[rng.randrange(len(texts))], [texts[rng.randrange(len(texts))] for _ in range(3)])
            for _ in range(calls + 20)]
    for q, c in reqs[:20]:
        verifier.score_sync(q, c)
    times = []
    for q, c in reqs[20:]:
        t = time.perf_counter()
        verifier.score_sync(q, c)
        times.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p90_ms": round(float(np.percentile(times, 90)), 2)}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from policy.data import DataSpec, training_texts

    common.require_data()
    t0 = time.time()
    embedder = common.load_embedder(threads=args.threads)
    held = Q.held_back(SimpleNamespace(tiny=args.tiny, verifier=True))
    workloads = Q.load_workloads(args.workloads, qqp_pairs=args.qqp_pairs, paws_pairs=args.paws_pairs, pawsx_pairs=0,
                                 xquad_questions=args.xquad_questions, mock_pairs=args.mock_pairs,
                                 exclude=training_texts(DataSpec.tiny() if args.tiny else None) | held)
    Q.embed_workloads(workloads, common.EmbeddingCache(embedder))
    result: dict[str, Any] = {"machine": common.machine_info(), "embedder": embedder.id, "workloads": {},
                              "verifiers": {}}
    with tempfile.TemporaryDirectory(prefix="velo-verifiers-") as tmp:
        verifiers = load_verifiers(embedder.id, Path(tmp), threads=args.threads)
        for name, v in verifiers.items():
            result["verifiers"][name] = {"id": v.id, "precision": v.metadata.get("precision"),
                                         "cosine_floor": v.calibration.get("cosine_floor"),
                                         "thresholds": v.calibration.get("thresholds")}
        if args.speed:  # one thread, as the proxy runs it (VELO_VERIFIER_THREADS=1), nothing else running
            from velo_proxy.verifier import PairVerifier

            for name, v in verifiers.items():
                one = PairVerifier(v.model_dir, threads=1, embedder_id=embedder.id)
                result["verifiers"][name]["speed"] = speed(one, workloads[0], calls=20 if args.tiny else 200)
                one.close()
        for w in workloads:
            pos = w.positives_mask()
            print(f"[{w.name}] {w.n} requests, {int(pos.sum())} positives", file=sys.stderr, flush=True)
            rows: dict[str, Any] = {}
            rp = Q.Replay(w.emb, w.cluster, m=48)
            rows["oracle (top-5)"] = rp.run(Q.oracle_decider(w.cluster)).metrics(pos, w)
            rows["threshold 0.95"] = {"threshold": 0.95, **rp.run(Q.threshold_decider(0.95), need=1).metrics(pos, w)}
            for name, v in verifiers.items():
                wr: dict[str, Any] = {"curves": {}, "points": {}}
                Q.verified_rows(w, v, pos, wr)
                for point, m in wr["points"].items():
                    rows[f"{name}, {point.replace('verified ', '')}"] = m
                if not wr["points"]:
                    rows[f"{name}: no δ holds"] = None
                result["verifiers"][name].setdefault("scoring_s", {})[w.name] = wr.get("verifier_scoring_s")
            result["workloads"][w.name] = {"requests": w.n, "positives": int(pos.sum()), "rows": rows}
    result["minutes"] = round((time.time() - t0) / 60, 1)
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [f"Measured by `{command}` ({result['minutes']} min; {result['machine'].get('cpu', 'this machine')}), "
             f"retrieval with `{result['embedder']}`. Each verifier at every δ its own card calibrated "
             "(on training-only streams); QQP's estimated FHR counts cross-cluster hits at the label audit's "
             "upper bounds (docs/verifier.md).", ""]
    for name, v in result["verifiers"].items():
        th = ", ".join(f"δ={d}: {t:.4f}" for d, t in sorted(v["thresholds"].items(), key=lambda kv: float(kv[0])))
        sp = v.get("speed")
        sp = f"; one request's 3 pairs in one call, 1 thread: p50 {sp['p50_ms']} ms, p90 {sp['p90_ms']} ms" if sp else ""
        lines.append(f"- {name} (`{v['id']}`, cosine floor {v['cosine_floor']}): {th or 'no δ holds'}{sp}")
    for wname, wres in result["workloads"].items():
        lines += ["", f"**{wname}** ({wres['requests']:,} requests, {wres['positives']:,} positives)", "",
                  "| system | hit rate | hits | false hits | FHR | FHR estimated |", "|---|---:|---:|---:|---:|---:|"]
        for sysname, m in wres["rows"].items():
            if m is None:
                lines.append(f"| {sysname} | — | 0 | | | |")
                continue
            lines.append(f"| {sysname} | {100 * m['hit_rate']:.1f} % | {m['hits']:,} | {m['false']:,} | "
                         f"{100 * m['fhr']:.1f} % | {100 * m['fhr_estimated']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["qqp", "paws-wiki", "gptcache-mock"])
    ap.add_argument("--qqp-pairs", type=int, default=20000)
    ap.add_argument("--paws-pairs", type=int, default=8000)
    ap.add_argument("--xquad-questions", type=int, default=2000)
    ap.add_argument("--mock-pairs", type=int, default=999)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embedder", choices=("all-MiniLM-L6-v2", "multilingual-e5-small"), default="all-MiniLM-L6-v2",
                    help="retrieval embedder (exported); each verifier is measured with its calibration for it")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-speed", dest="speed", action="store_false",
                    help="leave out the verification latency (measure it only with nothing else running)")
    ap.add_argument("--data-dir", type=Path, default=None, help="the datasets (default ../shared/data; env VELO_DATASETS_DIR)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--no-doc", dest="write_doc", action="store_false")
    args = ap.parse_args(argv)
    if args.data_dir is not None:
        os.environ["VELO_DATASETS_DIR"] = str(args.data_dir)
    os.environ["VELO_EMBEDDER"] = args.embedder  # common.load_embedder reads the settings
    section = SECTION if args.embedder == "all-MiniLM-L6-v2" else f"{SECTION}-e5"
    if args.tiny:
        args.qqp_pairs, args.paws_pairs, args.mock_pairs, args.xquad_questions = 400, 300, 100, 60
    result = evaluate(args)
    if args.json:
        import json

        args.json.write_text(json.dumps(result, indent=1, default=float))
    body = markdown(result, "python benchmarks/verifiers.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(body)
    if args.write_doc:
        Q.write_section(args.doc, section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
