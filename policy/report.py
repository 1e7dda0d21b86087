"""docs/policy-results.md (another embedder's policy: docs/policy-results-<embedder>.md) and docs/img/policy-*.png
from a reproduce run."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import numpy as np

WS = (0.01, 0.1, 1.0)
EDGES = (2, 3, 4, 5)
MODES = ("nearest", "all")
LEARNED = ("lrs", "t-mappo", "g-mappo", "mappo")
LABEL = {"lrs": "LRS", "t-mappo": "T-MAPPO", "g-mappo": "G-MAPPO", "mappo": "MAPPO"}
MODE_LABEL = {"nearest": "nearest edge", "all": "all edges (fastest answer)"}


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _plots(repo: Path, run: Path, results, names_by_w, *, prefix: str = "policy") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = repo / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    for j, w in enumerate(WS):
        for m in LEARNED:
            p = run / f"{m}-w{w:g}.csv"
            if not p.exists():
                continue
            rows = _read_csv(p)
            vrows, rows = rows, [r for r in rows if r["rollout_reward"]]  # update 0 = validation only
            x = np.array([float(r["env_steps"]) for r in rows])
            y = np.array([float(r["rollout_reward"]) for r in rows])
            k = min(5, len(y))
            ys = np.convolve(y, np.ones(k) / k, mode="valid")
            axes[0, j].plot(x[k - 1 :], ys, label=LABEL[m])
            vx = [float(r["env_steps"]) for r in vrows if r["val_reward"]]
            vy = [float(r["val_reward"]) for r in vrows if r["val_reward"]]
            axes[1, j].plot(vx, vy, marker="o", label=LABEL[m])
        axes[0, j].set_title(f"w = {w:g}: rollout reward (train split, moving avg)")
        axes[1, j].set_title(f"w = {w:g}: validation reward (best serving rule)")
        axes[1, j].set_xlabel("agent decisions")
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / f"{prefix}-training-curves.png", dpi=90)
    plt.close(fig)
    files.append(f"img/{prefix}-training-curves.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for j, mode in enumerate(MODES):
        for name in names_by_w[0.1]:
            if name.startswith("Random") or name == "Greedy-LLM":
                continue
            ys = [results[(0.1, n, mode, name)]["reward"] for n in EDGES]
            axes[j].plot(EDGES, ys, marker="o", label=name, lw=2.5 if name == "LRS" else 1)
        axes[j].set_title(f"w = 0.1, {MODE_LABEL[mode]}: test reward vs number of edges")
        axes[j].set_xlabel("edges N")
        axes[j].set_xticks(EDGES)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(img / f"{prefix}-edges.png", dpi=90)
    plt.close(fig)
    files.append(f"img/{prefix}-edges.png")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for j, w in enumerate(WS):
        names = names_by_w[w]
        vals = [results[(w, 3, "nearest", n)]["reward"] for n in names]
        colors = ["tab:red" if n.startswith("LRS") else ("tab:grey" if n == "Oracle" else "tab:blue") for n in names]
        axes[j].barh(range(len(names)), vals, color=colors)
        axes[j].set_yticks(range(len(names)), names, fontsize=8)
        axes[j].invert_yaxis()
        lo = min(vals)
        axes[j].set_xlim(lo - 0.05 * abs(lo), max(vals) + 0.05 * abs(lo))
        axes[j].set_title(f"w = {w:g}, N = 3, nearest: test reward")
    fig.tight_layout()
    fig.savefig(img / f"{prefix}-reward.png", dpi=90)
    plt.close(fig)
    files.append(f"img/{prefix}-reward.png")
    return files


def report_names(stem: str) -> tuple[str, str]:
    """(document under docs/, plot prefix under docs/img/) of the shipped policy ``stem``: the default
    embedder's policy writes docs/policy-results.md, another embedder's its own page beside it."""
    if stem == "lrs-default":
        return "policy-results.md", "policy"
    name = stem.removeprefix("lrs-")
    return f"policy-results-{name}.md", f"policy-{name}"


def write_report(repo: Path, run: Path, data, results, thresholds, calibrations, cal_rows, sens, meta, parity_diff, *,
                 t_train: float, t_total: float, updates: int, eval_steps: int, stem: str = "lrs-default",
                 command: str = "python -m policy.reproduce") -> None:
    doc_name, prefix = report_names(stem)
    names_by_w = {}
    for k in results:
        names_by_w.setdefault(k[0], [])
        if k[3] not in names_by_w[k[0]]:
            names_by_w[k[0]].append(k[3])
    files = _plots(repo, run, results, names_by_w, prefix=prefix)
    L = []
    L.append("# Policy results (simulator, test split)\n")
    L.append(f"Written by `{command}` — do not edit by hand. Design, QoS model and readings of the "
             "paper's equations: [policy.md](policy.md).\n")
    L.append(f"- Data: {data.q_emb.shape[0]} request texts in {len(data.c_members)} clusters (QQP duplicate clusters with "
             f"near misses, XQuAD x5 languages, oasst1, NQ-open), split by cluster group; embedder `{data.embedder_id}`; "
             f"measured oasst1 sibling-reply distance {data.llm_distance:.3f}.")
    L.append(f"- Learned methods trained per w, N = 3, nearest-edge mode, {updates} PPO updates each; evaluated unchanged "
             f"for N = 2..5 and both modes. Test episodes: {eval_steps} steps (N requests per step, one per region), empty caches at start; "
             f"every number is the mean over {len(results[(0.1, 3, 'nearest', 'LRS')]['reward_seeds'])} request streams "
             "(stream seeds), the same streams for every method. Streams are shaped like the proxy's benchmark "
             "workloads (`SimConfig.stream = 'clusters'`: whole groups, every text once, in random order, so the first "
             "arrival of a cluster and interleaved near misses are semantic decisions). Hit features include the pair "
             f"verifier's scores ({data.pair_scores.verifier_key if data.pair_scores is not None else 'none'}; "
             "docs/policy.md, Observation).")
    L.append(f"- Static threshold (GPTCache/LiteLLM style) chosen on validation: "
             + ", ".join(f"w={w:g}: {thresholds[w]:.2f}" for w in WS) + ".")
    L.append(f"- Runtime: training {t_train / 60:.1f} min, total {t_total / 60:.1f} min on {platform.machine()} "
             f"(2 shared cores).\n")
    L.append("Columns: reward (Eq. 11, x10), satisfaction q (Eq. 2), delay d (s), LLM = share of decisions that forward "
             "as is (B), C = share that augment, hit = share of requests answered from a cache, false hit = wrong cache "
             "answers / cache answers. LRS rows are one trained actor with three serving rules: `LRS` serves A iff "
             "P(A) ≥ τ with τ chosen on validation for reward (as the static threshold is), `LRS (δ=0.02)` with τ "
             "calibrated for a 2 % false-hit bound (the proxy's default), `LRS (argmax)` takes the most probable "
             "action. **Bold**: best reward without the oracle.\n")
    for w in WS:
        for mode in MODES:
            L.append(f"## w = {w:g}, N = 3, {MODE_LABEL[mode]}\n")
            L.append("| method | reward | satisfaction | delay (s) | LLM freq | C freq | hit rate | false-hit rate |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            names = names_by_w[w]
            best = max(results[(w, 3, mode, n)]["reward"] for n in names if n != "Oracle")
            for n in names:
                r = results[(w, 3, mode, n)]
                rw = f"{r['reward']:.3f}"
                if r["reward"] == best:
                    rw = f"**{rw}**"
                L.append(f"| {n} | {rw} | {r['satisfaction']:.3f} | {r['delay']:.3f} | {r['llm_freq']:.3f} | "
                         f"{r['c_freq']:.3f} | {r['hit_rate']:.3f} | {r['false_hit_rate']:.3f} |")
            L.append("")
    L.append("## Reward by number of edges (test)\n")
    for mode in MODES:
        L.append(f"### {MODE_LABEL[mode]}\n")
        L.append("| method | " + " | ".join(f"w={w:g} N={n}" for w in WS for n in EDGES) + " |")
        L.append("|---|" + "---:|" * (len(WS) * len(EDGES)))
        for n_ in names_by_w[0.1]:
            cells = []
            for w in WS:
                for n in EDGES:
                    name = n_ if (w, n, mode, n_) in results else next(x for x in names_by_w[w] if x.split(" (")[0] == n_.split(" (")[0])
                    cells.append(f"{results[(w, n, mode, name)]['reward']:.2f}")
            L.append(f"| {n_.split(' (0')[0]} | " + " | ".join(cells) + " |")
        L.append("")
    from .evaluate import paired_difference

    n_seeds = len(results[(0.1, 3, "nearest", "LRS")]["reward_seeds"])
    L.append("Does LRS beat every baseline on reward at w = 0.1 (N = 2..5, both modes)? Every method runs on the same "
             f"{n_seeds} test streams, so the comparison is paired: *LRS − best* is the mean over streams of LRS's reward "
             "minus the best baseline's on the same stream, ± its standard error; *ahead* counts the streams where "
             "LRS is ahead. The spread between streams (their difficulty) is far larger than between methods and "
             "cancels in the difference. (What limits LRS: [policy.md, Status](policy.md#status-lrs-at-w--01).)\n")
    L.append("| mode | N | LRS | LRS (δ=0.02) | best baseline | its reward | LRS − best (± SE) | ahead | LRS wins |")
    L.append("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for mode in MODES:
        for n in EDGES:
            base = [(results[(0.1, n, mode, x)]["reward"], x) for x in names_by_w[0.1] if not x.startswith("LRS") and x != "Oracle"]
            b = max(base)
            lrs, lc = results[(0.1, n, mode, "LRS")], results[(0.1, n, mode, "LRS (δ=0.02)")]["reward"]
            d = paired_difference(lrs, results[(0.1, n, mode, b[1])])
            win = "yes" if d["mean"] > 0 else "NO"
            if d["mean"] > 0 and d["mean"] > 2 * d["se"]:
                win += " (> 2 SE)"
            L.append(f"| {mode} | {n} | {lrs['reward']:.3f} | {lc:.3f} | {b[1]} | {b[0]:.3f} | {d['mean']:+.4f} ± "
                     f"{d['se']:.4f} | {d['ahead']}/{d['seeds']} | {win} |")
    L.append("")
    L.append("## Calibration (w = 0.1, N = 3, nearest; thresholds fitted on validation, measured on test)\n")
    L.append("| δ | threshold on P(A) | test false-hit rate | test hit rate | test reward | ≤ δ |")
    L.append("|---:|---:|---:|---:|---:|---|")
    for d, tau, m in cal_rows:
        L.append(f"| {d:g} | {tau:.4f} | {m['false_hit_rate']:.4f} | {m['hit_rate']:.3f} | {m['reward']:.3f} | "
                 f"{'yes' if m['false_hit_rate'] <= d else 'NO'} |")
    L.append("")
    L.append("## Sensitivity of the QoS model (w = 0.1, N = 3, nearest; policies and threshold unchanged)\n")
    L.append("| QoS change | LRS | LRS (δ=0.02) | best baseline | its reward | Oracle |")
    L.append("|---|---:|---:|---|---:|---:|")
    for label, row in sens:
        b = max((v, k) for k, v in row.items() if not k.startswith("LRS") and k != "Oracle")
        L.append(f"| {label} | {row['LRS']:.3f} | {row['LRS (δ=0.02)']:.3f} | {b[1]} | {b[0]:.3f} | {row['Oracle']:.3f} |")
    L.append("")
    L.append("## Shipped policy\n")
    L.append(f"`velo_proxy/policies/{stem}.onnx` (LRS, w = 0.1), policy version `{meta['velo_policy_version']}`, "
             f"feature version {meta['velo_feature_version']}, D = {meta['velo_dim']}, P = {meta['velo_top_p']}, "
             f"K = {meta['velo_k']}; torch vs onnxruntime max abs diff {parity_diff:.1e}. Calibration thresholds on P(A): "
             f"`{json.dumps(json.loads(meta['velo_calibration'])['thresholds'])}`, reward threshold "
             f"{json.loads(meta['velo_calibration'])['reward_threshold']}; the validation table behind them is in "
             f"`velo_proxy/policies/{stem}.json`.\n")
    L.append("## Plots\n")
    for f in files:
        L.append(f"![{f}]({f})\n")
    from .reproduce_dlrs import existing_section, replace_section

    doc = repo / "docs" / doc_name
    kept = existing_section(doc)  # the DLRS stage's section is its own; a rewrite of the rest keeps it
    doc.write_text("\n".join(L) + "\n")
    if kept is not None:
        replace_section(doc, kept.split("\n"))


def main(argv=None) -> None:
    """Rewrite docs/policy-results.md and the plots from a finished run (no training, no evaluation):
    ``python -m policy.report [run dir]``."""
    import argparse
    import json
    import pickle

    from .data import DataSpec, cache_dir
    from velo_proxy.policy import shipped_policy_stem

    from .reproduce import REPO, _dataset

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run", type=Path, nargs="?", default=cache_dir() / "runs" / "full")
    a = ap.parse_args(argv)
    with open(a.run / "results.pkl", "rb") as f:
        r = pickle.load(f)
    data, _ = _dataset(DataSpec(), a.run.parent)
    stem = shipped_policy_stem(data.embedder_id)
    side = json.loads((REPO / "velo_proxy" / "policies" / f"{stem}.json").read_text())
    meta = {k: v for k, v in side.items() if k.startswith("velo_")}
    meta["velo_calibration"] = json.dumps(side["velo_calibration"], sort_keys=True)
    write_report(REPO, a.run, data, r["results"], r["thresholds"], r["calibrations"], r["cal_rows"], r["sens"], meta,
                 side["parity_max_abs_diff"], t_train=r.get("t_train", 0.0), t_total=r.get("t_total", 0.0),
                 updates=r.get("updates", 80), eval_steps=r.get("eval_steps", 500), stem=stem,
                 command=side.get("training_command", "python -m policy.reproduce"))


if __name__ == "__main__":
    main()
