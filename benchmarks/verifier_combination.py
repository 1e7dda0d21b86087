"""Would two verifiers together be surer than the better one alone? (issue #12)

    python benchmarks/verifier_combination.py [--pairs 3000] [--data-dir DIR]

Scores the held-out labelled pairs both verifier cards are measured on (``policy.verifier_train.held_out_pairs``:
QQP and PAWS-Wiki calibration pairs, never trained on) with the installed English verifier
(``pair-verifier``) and the multilingual one (``e5-pair-verifier``), and reports each alone and two
combinations (the minimum: serve only what both pass; the mean): ROC AUC, and the share of duplicates a
threshold reaches while the labelled precision stays at 95 % and 98 % (the top of the ranking is where a
false-hit bound is decided). Scores are cached on disk (``policy.verifier_calibrate.ScoreCache``).
Data: ``--data-dir`` / ``VELO_DATASETS_DIR``, default ``../shared/data``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy import verifier_calibrate as C  # noqa: E402
from policy.data import DATASETS_ENV  # noqa: E402
from policy.verifier_train import VerifierConfig, held_out_pairs, pair_metrics  # noqa: E402
from velo_proxy.settings import default_home  # noqa: E402
from velo_proxy.verifier import PairVerifier  # noqa: E402


def recall_at_precision(scores: np.ndarray, labels: np.ndarray, precision: float) -> float:
    """The largest share of positives any threshold reaches with labelled precision >= ``precision``."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order])
    ok = tp / np.arange(1, len(labels) + 1) >= precision
    return float(tp[ok].max() / labels.sum()) if ok.any() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3000, help="held-out pairs (the cards use 3,000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=None, help="datasets (env VELO_DATASETS_DIR; default ../shared/data)")
    a = ap.parse_args(argv)
    if a.data_dir is not None:
        os.environ[DATASETS_ENV] = str(a.data_dir)
    t0 = time.perf_counter()
    cfg = VerifierConfig()
    held = held_out_pairs(cfg.data, a.pairs, cfg.seed)
    labels = np.array([p.label for p in held])
    qa, qb = [p.a for p in held], [p.b for p in held]
    models = default_home() / "models"  # where `velo-proxy models export` writes both verifiers
    cache = C.ScoreCache()
    english = cache.score(PairVerifier(models / "pair-verifier", threads=a.threads), qa, qb)
    e5 = cache.score(PairVerifier(models / "e5-pair-verifier", threads=a.threads), qa, qb)
    rows = {"pair-verifier (English)": english, "e5-pair-verifier (default)": e5,
            "min of both": np.minimum(english, e5), "mean of both": (english + e5) / 2}
    print(f"{len(held)} held-out pairs ({int(labels.sum())} duplicates), {time.perf_counter() - t0:.0f} s\n")
    print("| verifier | ROC AUC | duplicates reached at precision 95 % | at 98 % |")
    print("|---|---:|---:|---:|")
    for name, s in rows.items():
        print(f"| {name} | {pair_metrics(s, labels)['auc']:.4f} | {recall_at_precision(s, labels, 0.95):.1%} "
              f"| {recall_at_precision(s, labels, 0.98):.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
