"""How the pair verifier scores a question against itself (why the request path serves the request's
own question without asking it: ``velo_proxy.scope.same_question``).

    python benchmarks/verifier_identical.py [--questions 400] [--data-dir DIR]

Scores (q, q) for a seeded sample of QQP questions with the exported verifier and prints the
distribution and the share below the shipped calibrated thresholds. The verifier was trained on
pairs of distinct texts only, so identical texts are outside what it learned.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    common.set_data_dir(args.data_dir)
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    rows = [json.loads(line) for line in (common.require_data() / "pairs" / "qqp-dev.jsonl").open(encoding="utf-8")]
    questions = [r["q1"] for r in random.Random(args.seed).sample(rows, min(args.questions, len(rows)))]
    verifier = PairVerifier(Settings(verifier="pair-verifier").verifier_dir, threads=2)  # the English one
    scores = verifier.score_many(questions, questions)
    print(f"verifier {verifier.id}: {len(questions)} QQP questions scored against themselves")
    print("score of (q, q): min %.3f, p5 %.3f, median %.3f, p95 %.3f" % (
        scores.min(), *np.percentile(scores, [5, 50, 95])))
    for delta, threshold in sorted(verifier.calibration.get("thresholds", {}).items()):
        print(f"below the delta = {delta} threshold {threshold:.4f}: {float((scores < threshold).mean()):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
