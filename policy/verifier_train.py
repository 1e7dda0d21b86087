"""Train the pair verifier, export it, calibrate its serving rule, and (``--ship``) put it in the package.

    python -m policy.verifier_train --ship          # the shipped model (< 1 h on 2 cores)
    python -m policy.verifier_train --tiny --out /tmp/v   # a smoke run on a few hundred pairs

Reads top to bottom: data (``policy.verifier_data``) -> fine-tune MiniLM as a cross-encoder (embedding
tables frozen) -> save the changed weights (float16) -> export ONNX fp32 and int8 and measure both on
held-out calibration pairs -> calibrate the serving rule on the stream-shaped calibration workloads
(``policy.verifier_calibrate``) for each precision -> write the card (``pair-verifier.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from policy import data as D
from policy import verifier_calibrate as C
from policy import verifier_data as V
from velo_proxy.model_export import EMBEDDER_ID, export_embedder


@dataclass
class VerifierConfig:
    """Hyperparameters of one verifier training run."""

    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed)."""
    batch_size: int = 32
    """Pairs per optimiser step."""
    lr: float = 4e-5
    """Peak AdamW learning rate (linear warm-up, then linear decay to 0)."""
    head_lr: float = 1e-3
    """Learning rate of the new linear head."""
    warmup: float = 0.06
    """Share of the steps spent warming up."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorms)."""
    max_length: int = 128
    """Tokens of a pair at most (longest-first truncation); serving uses the same."""
    frozen_layers: int = 2
    """Lowest transformer layers kept frozen besides the embeddings (cheaper steps)."""
    threads: int = 2
    """torch CPU threads."""
    seed: int = 0
    """Seed of data order, dropout and initialisation."""
    eval_every: int = 300
    """Steps between progress evaluations on a held-out sample."""
    data: V.VerifierDataSpec = field(default_factory=V.VerifierDataSpec)
    """Which pairs (see ``policy.verifier_data``)."""


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged)."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = scores >= 0.5
    return {"pairs": int(len(labels)), "auc": round(auc(scores, labels), 4),
            "accuracy@0.5": round(float((pred == (labels == 1)).mean()), 4),
            "precision@0.5": round(float((pred & (labels == 1)).sum() / max(1, pred.sum())), 4),
            "recall@0.5": round(float((pred & (labels == 1)).sum() / max(1, (labels == 1).sum())), 4)}


def batches(pairs: list[V.Pair], tokenizer, batch_size: int, rng: random.Random):
    """Length-bucketed batches (little padding), in random order."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].a) + len(pairs[i].b) + rng.random() * 20)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    for idx in chunks:
        encs = tokenizer.encode_batch([(pairs[i].a[:2000], pairs[i].b[:2000]) for i in idx])
        yield (np.array([e.ids for e in encs], dtype=np.int64), np.array([e.attention_mask for e in encs], dtype=np.int64),
               np.array([e.type_ids for e in encs], dtype=np.int64),
               np.array([pairs[i].label for i in idx], dtype=np.float32))


def train(cfg: VerifierConfig, pairs: list[V.Pair], held: list[V.Pair], *, progress: bool = True,
          model=None, tokenizer=None):
    """Fine-tune; returns the torch module (eval mode) and the training curve. ``model`` and ``tokenizer``
    (padding and truncation set): another base than MiniLM (``policy.verifier_multilingual``); the module
    needs ``bert.embeddings``, ``bert.encoder.layer``, ``head`` and ``logits(ids, mask, types)``."""
    import torch
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from velo_proxy.model_export import source_model_dir
    from velo_proxy.verifier_export import build_torch_module

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    tok = tokenizer
    if tok is None:
        tok = Tokenizer.from_file(str(source_model_dir() / "tokenizer.json"))
        tok.no_padding()
        tok.enable_padding(pad_id=0, pad_token="[PAD]")
        tok.enable_truncation(max_length=cfg.max_length, strategy="longest_first")
    if model is None:
        model = build_torch_module(None)
        model.bert.set_attn_implementation("sdpa") if hasattr(model.bert, "set_attn_implementation") else None
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    for layer in model.bert.encoder.layer[: cfg.frozen_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)
    # no decay on biases and layer norms, found by type (e5's are named aln/oln, not LayerNorm)
    norms = {id(p) for m in model.bert.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.bert.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or id(p) in norms else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
                             {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
                             {"params": model.head.parameters(), "weight_decay": 0.0, "lr": cfg.head_lr}])
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm + 1e-9))))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    curve: list[dict[str, float]] = []
    step, seen, running = 0, 0, 0.0
    bar = tqdm(total=total, desc="verifier", unit="step", disable=not progress)
    model.train()
    t0 = time.perf_counter()
    while step < total:
        for ids, mask, types, y in batches(pairs, tok, cfg.batch_size, rng):
            logits = model.logits(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))  # [B]
            loss = loss_fn(logits, torch.from_numpy(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(y)
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if held and (step % cfg.eval_every == 0 or step == total):
                m = evaluate_torch(model, held, tok)
                curve.append({"step": step, "pairs_seen": seen, "loss": round(running, 4), "seconds": round(time.perf_counter() - t0, 1), **m})
                bar.write(f"step {step}: loss {running:.3f}, held-out AUC {m['auc']:.4f}, acc {m['accuracy@0.5']:.4f}")
                model.train()
            if step >= total:
                break
    bar.close()
    return model.eval(), curve


def evaluate_torch(model, pairs: list[V.Pair], tok) -> dict[str, float]:
    import torch

    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for ids, mask, types, y in batches(pairs, tok, 64, random.Random(0)):
            scores.append(model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)).numpy())
            labels.append(y)
    return pair_metrics(np.concatenate(scores), np.concatenate(labels).astype(int))


def held_out_pairs(spec: V.VerifierDataSpec, n: int, seed: int) -> list[V.Pair]:
    """Labelled calibration pairs (never trained on) for progress and precision checks."""
    rows = V.qqp_split(spec)["calibration"] + V.paws_split(spec)["calibration"]
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [V.Pair(r["q1"], r["q2"], int(r["duplicate"]), "held") for r in rows[:n]]


def serving_ms(verifier, held: list[V.Pair], *, calls: int = 200, top_k: int = 3) -> float:
    """p50 ms of one call as the request path makes it: one question against ``top_k`` cached candidates,
    one intra-op thread (``VELO_VERIFIER_THREADS`` defaults to 1)."""
    for i in range(10):
        verifier.score_sync(held[i].a, [p.b for p in held[i:i + top_k]])
    times = np.empty(calls)
    for i in range(calls):
        group = held[(i * top_k) % (len(held) - top_k):][:top_k]
        t0 = time.perf_counter()
        verifier.score_sync(group[0].a, [p.b for p in group])
        times[i] = time.perf_counter() - t0
    return round(float(np.median(times) * 1e3), 2)


def measure_precisions(build, held: list[V.Pair], *, threads: int) -> dict[str, dict[str, float]]:
    """Each precision's export (``build(precision)`` -> its directory) measured on the held-out pairs: the
    ranking, the bulk speed (``threads``) and the time of one request-path call (``serving_ms``)."""
    from velo_proxy.verifier import PairVerifier

    labels = np.array([p.label for p in held])
    metrics = {}
    for precision in ("fp32", "int8"):
        path = build(precision)
        verifier = PairVerifier(path, threads=threads)
        t0 = time.perf_counter()
        scores = verifier.score_many([p.a for p in held], [p.b for p in held])
        metrics[precision] = {**pair_metrics(scores, labels),
                              "pairs_per_s": round(len(held) / (time.perf_counter() - t0), 1),
                              "serving_ms": serving_ms(PairVerifier(path, threads=1), held)}
        print(f"{precision}: {metrics[precision]}", file=sys.stderr)
    return metrics


def int8_pays(metrics: dict[str, dict[str, float]]) -> bool:
    """int8 when it keeps the held-out ranking (AUC within 0.005 of fp32) and is worth it: a request-path
    call (``serving_ms``; cards measured before it: bulk pairs per second) at least 1.2x faster. On CPUs
    without int8 dot products it is not."""
    m32, m8 = metrics["fp32"], metrics["int8"]
    if "serving_ms" in m32 and "serving_ms" in m8:
        faster = m32["serving_ms"] >= 1.2 * m8["serving_ms"]
    else:
        faster = m8["pairs_per_s"] >= 1.2 * m32["pairs_per_s"]
    return m32["auc"] - m8["auc"] <= 0.005 and faster


def card_markdown(card: dict) -> str:
    """The measured part of docs/verifier.md, from the card."""
    lines = [f"Card of `{card['id']}` (`{card.get('command', 'python -m policy.verifier_train --ship')}`): "
             f"{sum(v['positive'] + v['negative'] for v in card['data'].values()):,} training pairs, "
             f"training {card['train_seconds'] / 60:.1f} min, whole run {card.get('total_seconds', 0) / 60:.1f} min "
             f"on this 2-core machine; precision shipped: **{card['precision']}**.\n",
             "| source | positives | negatives |", "|---|---|---|"]
    lines += [f"| {k} | {v['positive']:,} | {v['negative']:,} |" for k, v in sorted(card["data"].items())]
    lines += ["", "Held-out labelled pairs (3,000 QQP and PAWS calibration pairs, never trained on):", ""]
    return "\n".join(lines + metrics_table(card["metrics"]) + calibration_sections(card))


def calibrate_per_embedder(verifier_of, workloads, spec: V.VerifierDataSpec, *, others: list, tiny: bool = False,
                           progress: bool = True) -> dict[str, dict[str, dict]]:
    """``{precision: {embedder id: block}}``: each precision's verifier (``verifier_of(precision)``) calibrated on
    ``workloads`` with all-MiniLM-L6-v2 at the cosine floor, and with each of ``others`` at the floor that keeps
    the same share of QQP training duplicates (``matched_cosine_floor``: their similarities are not MiniLM's)."""
    from .verifier_multilingual import matched_cosine_floor

    minilm = D.load_embedder()
    floors = {e.id: matched_cosine_floor(e, spec, reference_floor=C.COSINE_FLOOR, n=200 if tiny else 2000)
              for e in others}
    out: dict[str, dict[str, dict]] = {}
    for precision in ("fp32", "int8"):
        verifier = verifier_of(precision)
        blocks = {minilm.id: {**C.calibrate(verifier, workloads, embedder=minilm, progress=progress),
                              "embedder_id": minilm.id}}
        for e in others:
            blocks[e.id] = {**C.calibrate(verifier, workloads, embedder=e, floor=floors[e.id]["floor"],
                                          progress=progress),
                            "embedder_id": e.id, "floor_matched": floors[e.id]}
        out[precision] = blocks
        for emb_id, block in blocks.items():
            print(f"{precision} calibration with {emb_id}: thresholds {block['thresholds']}", file=sys.stderr)
    return out


def metrics_table(metrics: dict) -> list[str]:
    """A card's held-out metrics per precision, as markdown lines."""
    lines = ["| precision | ROC AUC | accuracy @ 0.5 | precision @ 0.5 | recall @ 0.5 | pairs/s (bulk, 2 threads) "
             "| one request-path call p50 (3 pairs, 1 thread) |",
             "|---|---|---|---|---|---|---|"]
    for prec, m in metrics.items():
        serve = f"{m['serving_ms']:.2f} ms" if "serving_ms" in m else "–"
        lines.append(f"| {prec} | {m['auc']:.4f} | {m['accuracy@0.5']:.4f} | {m['precision@0.5']:.4f} | "
                     f"{m['recall@0.5']:.4f} | {m['pairs_per_s']:.0f} | {serve} |")
    return lines


def calibration_sections(card: dict) -> list[str]:
    """A card's calibration blocks (the shipped precision first, each embedder it serves with), as markdown."""
    from velo_proxy.verifier_export import calibration_blocks

    lines: list[str] = []
    for precision in sorted(card["calibration"], key=lambda p: p != card["precision"]):
        for emb_id, cal in calibration_blocks(card, precision, default_embedder=EMBEDDER_ID).items():
            how = ""
            if "floor_matched" in cal:
                fm = cal["floor_matched"]
                how = (f" The floor {fm['floor']} keeps {100 * fm['duplicates_kept']:.1f} % of {fm['pairs']:,} QQP "
                       f"training duplicates, as all-MiniLM-L6-v2's {C.COSINE_FLOOR} does (`matched_cosine_floor`).")
            lines += ["", f"**{precision}, serving with `{emb_id}`.**{how}", "", calibration_table(cal)]
    return lines


def calibration_table(cal: dict) -> str:
    """One calibration block (``policy.verifier_calibrate.calibrate``) as a markdown table."""
    lines = [f"Calibration (cosine floor {cal['cosine_floor']}, top-{cal['top_k']} verified, one-sided "
             f"{100 * cal['confidence']:.0f} % Clopper-Pearson bound of the pooled estimated false-hit rate ≤ δ and "
             f"every workload's estimate ≤ δ):", "",
             "| δ | score threshold | hits | estimated false | pooled FHR | upper bound | per workload: hit rate / FHR estimate |",
             "|---|---|---|---|---|---|---|"]
    for d, pt in cal["points"].items():
        if pt is None:
            lines.append(f"| {d} | none holds (never serve) | | | | | |")
            continue
        per = "; ".join(f"{k} {100 * v['hit_rate']:.1f} % / {100 * v['fhr_estimated']:.2f} %" for k, v in pt["workloads"].items())
        lines.append(f"| {d} | {pt['threshold']:.4f} | {pt['hits']:,} | {pt['false']:.1f} | {100 * pt['fhr']:.2f} % | "
                     f"{100 * pt['ucb']:.2f} % | {per} |")
    curve = [c for c in cal.get("curve") or [] if c.get("hits")]
    if curve and any(pt is None for pt in cal["points"].values()):
        best = min(curve, key=lambda c: c["ucb"])
        lines.append(f"\nThe lowest bound any threshold reaches: {100 * best['ucb']:.1f} % (score ≥ {best['threshold']:.4f}, "
                     f"{best['hits']:,} hits, {best['false']:.1f} estimated false).")
    audit = cal.get("label_audit") or {}
    if audit.get("unlabelled"):
        u, ln = audit["unlabelled"], audit["labelled_negative"]
        text = (f"\nQQP label noise (docs/verifier.md, *Label noise*): a hit on another cluster counts "
                f"{ln['upper']:.3f} when QQP labels it \"not duplicate\" and {u['upper']:.3f} "
                f"when unlabelled (first audit: {ln['wrong']} of {ln['audited']} and {u['wrong']} of {u['audited']} differ)")
        bands = audit.get("score_bands") or {}
        for (lo, wl), (_, wu) in zip(bands.get("labelled_negative", []), bands.get("unlabelled", [])):
            text += f"; at score ≥ {lo:g} (the audit of this verifier's own hits) {wl:.3f} and {wu:.3f}"
        lines.append(text + ".")
    return "\n".join(lines)


def write_card_doc(doc: Path, card: dict) -> None:
    text = doc.read_text()
    begin, end = "<!-- card:begin -->", "<!-- card:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{card_markdown(card)}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/verifier"), help="run directory")
    ap.add_argument("--ship", action="store_true", help="copy weights and card into velo_proxy/models/")
    ap.add_argument("--tiny", action="store_true", help="a smoke run on a few hundred pairs")
    ap.add_argument("--calibrate-only", action="store_true",
                    help="skip training: export, measure and calibrate the weights already in --out")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--max-train-pairs", type=int, default=None)
    ap.add_argument("--data-dir", type=Path, default=None, help="the datasets (default ../shared/data; env VELO_DATASETS_DIR)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--doc", type=Path, default=None, help="rewrite the measured section of this model card doc "
                    "(docs/verifier.md)")
    args = ap.parse_args(argv)
    if args.data_dir is not None:
        import os

        os.environ["VELO_DATASETS_DIR"] = str(args.data_dir)
    cfg = VerifierConfig()
    sim_spec = D.DataSpec()
    if args.tiny:
        cfg = VerifierConfig(epochs=1.0, eval_every=5, batch_size=16, data=V.VerifierDataSpec.tiny())
        sim_spec = D.DataSpec.tiny()
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.max_train_pairs is not None:
        cfg.data.max_train_pairs = args.max_train_pairs
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. data
    pairs = V.training_pairs(cfg.data, sim_spec=sim_spec, progress=args.progress) if not args.calibrate_only else []
    held = held_out_pairs(cfg.data, 120 if args.tiny else 3000, cfg.seed)
    counts: dict[str, list[int]] = {}
    for p in pairs:
        c = counts.setdefault(p.source if p.source.startswith(("rule", "template")) else p.source.split(":")[0], [0, 0])
        c[p.label] += 1
    print(f"{len(pairs)} training pairs: " + ", ".join(f"{k} {v[1]}+/{v[0]}-" for k, v in sorted(counts.items())),
          file=sys.stderr)

    from safetensors.torch import save_file

    from velo_proxy.verifier_export import CARD_FILE, WEIGHTS_FILE, build_dir, build_torch_module, shipped_dir, trained_state

    previous: dict = {}
    if args.calibrate_only:  # the weights and the training part of the card are there already
        previous = json.loads((out / CARD_FILE).read_text())
        curve, train_s, counts = previous["curve"], previous["train_seconds"], {
            k: [v["negative"], v["positive"]] for k, v in previous["data"].items()}
    else:
        # 2. train
        model, curve = train(cfg, pairs, held[:800], progress=args.progress)  # a quick progress check
        train_s = time.perf_counter() - t_start
        # 3. save what training changed
        save_file(trained_state(model), str(out / WEIGHTS_FILE))
    # the same weights keep their id (audits of a verifier's hits are keyed by it, policy.label_audit)
    card_id = previous["id"] if args.calibrate_only else f"velo-pair-verifier-{time.strftime('%Y%m%d')}"
    card: dict = {"id": card_id, "config": {**asdict(cfg), "data": asdict(cfg.data)},
                  "data": {k: {"positive": v[1], "negative": v[0]} for k, v in counts.items()},
                  "train_seconds": round(train_s, 1), "curve": curve, "metrics": {}, "calibration": {}}
    card["config"]["max_length"] = cfg.max_length
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")  # the training part: --calibrate-only reads it

    # 4. export both precisions, measure them on the held-out pairs, calibrate each
    shipped = build_torch_module(out / WEIGHTS_FILE)  # the float16-rounded weights, as shipped
    from velo_proxy.verifier import PairVerifier

    workloads = V.calibration_workloads(cfg.data, sim_spec=sim_spec)

    def build(precision: str) -> Path:
        return build_dir(out / f"model-{precision}", weights=out / WEIGHTS_FILE, card=card, precision=precision,
                         force=True)

    card["metrics"] = measure_precisions(build, held, threads=cfg.threads)
    del shipped
    card["precision"] = "int8" if int8_pays(card["metrics"]) else "fp32"
    # both precisions are calibrated (the other is the operator's `--verifier-precision`), each with every
    # embedder it can serve with: all-MiniLM-L6-v2 at the cosine floor, its int8 quantisation at the floor
    # that keeps the same share of training duplicates (its similarities are not fp32's)
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import MINILM_INT8_EMBEDDER_NAME

    int8_dir = export_embedder(out / MINILM_INT8_EMBEDDER_NAME, precision="int8")  # what `models export` builds
    card["calibration"] = calibrate_per_embedder(
        lambda precision: PairVerifier(out / f"model-{precision}", threads=cfg.threads), workloads, cfg.data,
        others=[OnnxEmbedder(int8_dir, threads=2)], tiny=args.tiny, progress=args.progress)
    card["total_seconds"] = round(time.perf_counter() - t_start, 1) + (train_s if args.calibrate_only else 0.0)
    card["command"] = "python -m policy.verifier_train " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    if args.doc is not None:
        write_card_doc(args.doc, card)
    print(f"card: {out / CARD_FILE} (precision {card['precision']}, {card['total_seconds']:.0f} s)", file=sys.stderr)
    if args.ship:
        dst = shipped_dir()
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / WEIGHTS_FILE, dst / WEIGHTS_FILE)
        shutil.copyfile(out / CARD_FILE, dst / CARD_FILE)
        print(f"shipped to {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
