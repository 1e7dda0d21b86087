"""Rebuild the dataset slices in tests/data from the full datasets (layout of ../shared/data).

    python tests/data/make_slices.py [DATASETS_DIR]      # default: $VELO_DATASETS_DIR, else ../shared/data

Every slice is the first rows of its file, in file order, unchanged (oasst1: the first whole conversation
trees), so a slice is a prefix of the public dataset. Sizes are what the tests need: DataSpec.tiny() in
tests/test_policy_train.py and the benchmark smoke tests (tests/test_benchmarks_smoke.py). The verifier's own
files in this directory are not made here (see README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

#: file -> rows kept (first N lines / elements; oasst1: first N message trees)
SLICES = {
    "pairs/qqp-dev.jsonl": 2500,
    "pairs/gptcache-mock-paraphrases.json": 200,
    "pairs/paws-wiki-dev.jsonl": 400,
    "qa/xquad-parallel-dev.jsonl": 60,
    "qa/nq-open-dev.jsonl": 100,
    "qa/oasst1-en-validation.jsonl": 16,
    **{f"sts/stsb-{lang}-train.csv": 300 for lang in ("en", "es", "de", "ru", "zh")},
    # PAWS-X dev is a translation of PAWS-Wiki dev rows; its first rows mostly fall in the PAWS-Wiki slice
    **{f"pairs/paws-x-dev-{lang}.jsonl": 120 for lang in ("de", "en", "es", "fr", "ja", "ko", "zh")},
}


def main(argv: list[str]) -> int:
    from policy.data import data_dir

    src = data_dir(argv[0] if argv else None)
    for rel, n in SLICES.items():
        text = (src / rel).read_text(encoding="utf-8")
        if rel.endswith(".json"):
            out = json.dumps(json.loads(text)[:n], ensure_ascii=False, indent=1) + "\n"
        elif "oasst1" in rel:
            lines = [line for line in text.splitlines(keepends=True) if line.strip()]
            trees: list[str] = []
            for line in lines:
                tree = json.loads(line)["message_tree_id"]
                if tree not in trees:
                    trees.append(tree)
            keep = set(trees[:n])
            out = "".join(line for line in lines if json.loads(line)["message_tree_id"] in keep)
        else:
            out = "".join(text.splitlines(keepends=True)[:n])
        (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
        (HERE / rel).write_text(out, encoding="utf-8")
        print(f"{rel}: {len(out.encode()):,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
