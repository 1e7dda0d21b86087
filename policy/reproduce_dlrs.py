"""The DLRS stage of ``python -m policy.reproduce``: DLRS and the paper's variants trained beside LRS at
the shipped w = 0.1 (same data, simulator, ``TrainConfig``, seed and number of updates), calibrated
the same way, evaluated on the same test streams for N = 2..5 in both modes, compared with LRS stream by
stream, exported, and timed per decision in onnxruntime (the proxy's settings). It writes the section
between the DLRS markers of docs/policy-results.md and docs/img/policy-dlrs.png.

    python -m policy.reproduce --dlrs               # this stage alone: trains LRS (w = 0.1) and the diffusion actors
    python -m policy.reproduce --dlrs --skip-train  # reuses the checkpoints in --out, trains only what is missing
    python -m policy.reproduce --quick --dlrs       # smoke run: tiny data, nothing written to docs/

A full ``python -m policy.reproduce`` runs it at the end, reusing the LRS checkpoint it has just trained.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from velo_proxy.calibration import DELTAS, delta_key

#: DLRS and the variants the paper lists, as we read their names (policy.train.ARCH_OPTIONS).
#: DLRS-V10 is the same configuration as DLRS (10 steps, noise scale 1.0): with the same seed it trains
#: the same weights, so it is not trained twice; its row is DLRS's.
DIFFUSION = ("dlrs", "dlrs-l5", "dlrs-l15", "dlrs-v5", "dlrs-v15")
DLABEL = {"dlrs": "DLRS", "dlrs-l5": "DLRS-L5", "dlrs-l15": "DLRS-L15", "dlrs-v5": "DLRS-V5", "dlrs-v15": "DLRS-V15"}
W = 0.1
BEGIN, END = "<!-- dlrs:begin (python -m policy.reproduce --dlrs) -->", "<!-- dlrs:end -->"


def _names(calibrations) -> list[tuple[str, str, float]]:
    """(row name, checkpoint method, tau) of every row the stage evaluates."""
    rows = [("LRS", "lrs", calibrations["lrs"]["reward_threshold"]),
            ("LRS (δ=0.02)", "lrs", calibrations["lrs"]["thresholds"]["0.02"])]
    for m in DIFFUSION:
        rows.append((DLABEL[m], m, calibrations[m]["reward_threshold"]))
    rows.append(("DLRS (δ=0.02)", "dlrs", calibrations["dlrs"]["thresholds"]["0.02"]))
    return rows


def _calibrate_job(args):
    data_path, out, method, steps = args
    import torch

    from .reproduce import calibrate_actor
    from .sim import SimConfig
    from .train import load_actor

    torch.set_num_threads(1)
    with open(data_path, "rb") as f:
        data = pickle.load(f)
    base = SimConfig()
    val = replace(base, split="val", qos=replace(base.qos, w=W))
    return method, calibrate_actor(data, load_actor(out / f"{method}-w{W:g}.pt")[0], val, steps)


def _eval_job(args):
    data_path, out, n, mode, rows, steps, seeds, key = args
    import torch

    from .baselines import NeuralPolicy
    from .evaluate import evaluate_seeds
    from .sim import SimConfig
    from .train import load_actor

    torch.set_num_threads(1)
    with open(data_path, "rb") as f:
        data = pickle.load(f)
    actors = {m: load_actor(out / f"{m}-w{W:g}.pt")[0] for m in {r[1] for r in rows}}
    base = SimConfig()
    cfg = replace(base, n_agents=n, mode=mode, split="test", qos=replace(base.qos, w=W))
    return key, {name: evaluate_seeds(data, NeuralPolicy(actors[m], name, tau=tau), cfg, steps, seeds)
                 for name, m, tau in rows}


def decision_ms(onnx_path: Path, *, dim: int, top_p: int, calls: int = 2000) -> dict:
    """Time of one decision in onnxruntime as the proxy runs it (``velo_proxy.policy``: one request per
    call, one intra-op thread): median and p99 over ``calls`` calls after a warm-up."""
    import onnxruntime as ort

    from velo_proxy import features as F

    from .export import example_inputs

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    ex = example_inputs(dim, top_p, batch=2, seed=3)
    one = {k: ex[k][1:2] for k in F.INPUT_NAMES}  # a request with hits
    for _ in range(50):
        sess.run(None, one)
    ts = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        sess.run(None, one)
        ts[i] = time.perf_counter() - t0
    return {"p50_ms": float(np.median(ts) * 1e3), "p99_ms": float(np.quantile(ts, 0.99) * 1e3)}


def run_stage(*, data, data_path: Path, out: Path, tkw: dict, eval_steps: int, jobs: int, train: tuple[str, ...],
              say) -> dict:
    """Train the methods in ``train`` (and any checkpoint missing in ``out``), calibrate, evaluate, export and
    time; returns the results (also pickled to ``out/dlrs-results.pkl``)."""
    import torch

    from .evaluate import evaluate_seeds
    from .export import export_onnx, parity
    from .reproduce import EDGES, MODES, SEEDS, _train_job
    from .sim import SimConfig
    from .train import load_actor, verifier_sha256_of

    t0 = time.time()
    todo = [m for m in ("lrs", *DIFFUSION) if m in train or not (out / f"{m}-w{W:g}.pt").exists()]
    train_s = {}
    tjobs = [(data_path, m, W, tkw, out) for m in todo]
    if tjobs:
        with mp.get_context("spawn").Pool(max(1, min(jobs, len(tjobs)))) as pool:
            for m, _, dt in pool.imap_unordered(_train_job, tjobs):
                train_s[m] = dt
                say(f"dlrs stage: trained {m} w={W:g} in {dt:.0f}s")
    t_train = time.time() - t0
    actors = {m: load_actor(out / f"{m}-w{W:g}.pt")[0] for m in ("lrs", *DIFFUSION)}
    params = {m: sum(p.numel() for p in a.parameters()) for m, a in actors.items()}

    base = SimConfig()
    test = replace(base, split="test", qos=replace(base.qos, w=W))
    calibrations = {}
    with mp.get_context("spawn").Pool(max(1, jobs)) as pool:
        for m, rec in pool.imap_unordered(_calibrate_job, [(data_path, out, m, eval_steps) for m in actors]):
            calibrations[m] = rec
            say(f"dlrs stage: {m} reward threshold {rec['reward_threshold']:.4f}, calibration {rec['thresholds']}")
    rows = _names(calibrations)

    results = {}
    ejobs = [(data_path, out, n, mode, rows, eval_steps, SEEDS, (n, mode)) for n in EDGES for mode in MODES]
    with mp.get_context("spawn").Pool(max(1, jobs)) as pool:
        for key, res in pool.imap_unordered(_eval_job, ejobs):
            for name, r in res.items():
                results[(*key, name)] = r
            say(f"dlrs stage: evaluated N={key[0]} {key[1]}")

    # does each calibrated delta hold on test (N = 3, nearest), for DLRS as for LRS
    from .baselines import NeuralPolicy

    cal_rows = []
    for d in DELTAS:
        tau = calibrations["dlrs"]["thresholds"][delta_key(d)]
        cal_rows.append((d, tau, evaluate_seeds(data, NeuralPolicy(actors["dlrs"], f"DLRS δ={d:g}", tau=tau), test,
                                                eval_steps, SEEDS)))

    # export every actor and time a decision; nothing else runs now (the pools are closed)
    timing, parities = {}, {}
    for m, a in actors.items():
        path = out / f"{m}-w{W:g}.onnx"
        export_onnx(a, path, dim=data.dim, top_p=base.top_p, embedder_id=data.embedder_id,
                    policy_version=f"{m}-stage", calibration=calibrations[m],
                    verifier_sha256=verifier_sha256_of(data))
        parities[m] = parity(a, path, dim=data.dim, top_p=base.top_p)
        timing[m] = decision_ms(path, dim=data.dim, top_p=base.top_p)
        say(f"dlrs stage: {m} onnx parity {parities[m]:.1e}, {timing[m]['p50_ms']:.3f} ms/decision p50")
    res = {"results": results, "calibrations": calibrations, "cal_rows": cal_rows, "timing": timing,
           "parity": parities, "params": params, "train_s": train_s, "t_train": t_train,
           "t_total": time.time() - t0, "eval_steps": eval_steps, "updates": tkw.get("updates"),
           "seeds": len(SEEDS), "torch": torch.__version__, "imitation_ppo": imitation_and_ppo(out)}
    with open(out / "dlrs-results.pkl", "wb") as f:
        pickle.dump(res, f)
    return res


def imitation_and_ppo(run: Path) -> dict[str, dict]:
    """Per actor with a training log in ``run``: validation reward of the imitation alone (update 0), the best
    validation reward and the update it came from (the kept checkpoint), and the last one: how much PPO
    added on top of the demonstrations."""
    import csv

    out = {}
    for m in ("lrs", *DIFFUSION):
        p = Path(run) / f"{m}-w{W:g}.csv"
        if not p.exists():
            continue
        with open(p) as f:
            rows = [(int(r["update"]), float(r["val_reward"])) for r in csv.DictReader(f) if r["val_reward"]]
        if not rows or rows[0][0] != 0:
            continue
        kept = max(rows, key=lambda r: r[1])  # first of equals: train() keeps a later one only if strictly better
        out[m] = {"imitation": rows[0][1], "kept_update": kept[0], "kept": kept[1], "last_update": rows[-1][0],
                  "last": rows[-1][1]}
    return out


def section(res: dict, *, run: Path | None = None) -> list[str]:
    """The markdown of the DLRS section (between the markers) from ``run_stage``'s results."""
    from .evaluate import paired_difference
    from .reproduce import EDGES, MODES

    R, cal = res["results"], res["calibrations"]
    L = [BEGIN, "## DLRS beside LRS (w = 0.1; `python -m policy.reproduce --dlrs`)\n"]
    L.append(f"DLRS and its variants (docs/policy.md, \"DLRS\": L*n* = *n* denoising steps, V*n* = noise scale *n*/10; "
             f"DLRS-V10 is DLRS's own configuration, so its row is DLRS's) trained with LRS's `TrainConfig`, seed, "
             f"demonstrations and {res['updates']} PPO updates at w = 0.1 (N = 3, nearest), each serving rule calibrated "
             f"on validation as LRS's is, and evaluated unchanged on the same {res['seeds']} test streams "
             f"({res['eval_steps']} steps). Training {res['t_train'] / 60:.1f} min, stage {res['t_total'] / 60:.1f} min.\n")
    names = [n for n in dict.fromkeys(k[2] for k in R)]
    for mode in MODES:
        L.append(f"### N = 3, {mode}\n")
        L.append("| method | reward | satisfaction | delay (s) | LLM freq | C freq | hit rate | false-hit rate |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n in names:
            r = R[(3, mode, n)]
            L.append(f"| {n} | {r['reward']:.3f} | {r['satisfaction']:.3f} | {r['delay']:.3f} | {r['llm_freq']:.3f} | "
                     f"{r['c_freq']:.3f} | {r['hit_rate']:.3f} | {r['false_hit_rate']:.3f} |")
        L.append("")
    L.append("### Paired with LRS, stream by stream (reward of the row − LRS's on the same stream, ± SE; ahead = streams won)\n")
    cols = [n for n in names if n.startswith("DLRS")]
    L.append("| mode | N | " + " | ".join(cols) + " |")
    L.append("|---|---:|" + "---:|" * len(cols))
    wins = 0
    for mode in MODES:
        for n in EDGES:
            cells = []
            for c in cols:
                ref = "LRS (δ=0.02)" if "δ" in c else "LRS"
                d = paired_difference(R[(n, mode, c)], R[(n, mode, ref)])
                mark = " **>2SE**" if d["mean"] > 2 * d["se"] else (" (<−2SE)" if d["mean"] < -2 * d["se"] else "")
                wins += int(c == "DLRS" and d["mean"] > 2 * d["se"])
                cells.append(f"{d['mean']:+.4f} ± {d['se']:.4f}, {d['ahead']}/{d['seeds']}{mark}")
            L.append(f"| {mode} | {n} | " + " | ".join(cells) + " |")
    L.append("\n`DLRS (δ=0.02)` is paired with `LRS (δ=0.02)`; every other row with `LRS` (both at their reward-chosen τ).\n")
    L.append("### Calibration of DLRS (N = 3, nearest; thresholds fitted on validation, measured on test)\n")
    L.append("| δ | threshold on P(A) | test false-hit rate | test hit rate | test reward | ≤ δ |")
    L.append("|---:|---:|---:|---:|---:|---|")
    for d, tau, m in res["cal_rows"]:
        L.append(f"| {d:g} | {tau:.4f} | {m['false_hit_rate']:.4f} | {m['hit_rate']:.3f} | {m['reward']:.3f} | "
                 f"{'yes' if m['false_hit_rate'] <= d else 'NO'} |")
    L.append("")
    L.append("### Cost of a decision (exported actor, onnxruntime, one request per call, 1 thread, as the proxy runs it)\n")
    L.append("| actor | parameters | denoising steps | ms/decision p50 | p99 | torch vs onnxruntime |")
    L.append("|---|---:|---:|---:|---:|---:|")
    from .train import ARCH_OPTIONS

    for m in ("lrs", *DIFFUSION):
        t = res["timing"][m]
        steps = ARCH_OPTIONS.get(m, {}).get("steps", "–")
        label = "LRS" if m == "lrs" else DLABEL[m]
        L.append(f"| {label} | {res['params'][m]:,} | {steps} | {t['p50_ms']:.3f} | {t['p99_ms']:.3f} | "
                 f"{res['parity'][m]:.1e} |")
    L.append("")
    gains = res.get("imitation_ppo") or {}
    if gains:
        L.append("### What PPO adds on top of the demonstrations (validation reward, best serving rule, w = 0.1)\n")
        L.append("| actor | imitation alone (update 0) | kept checkpoint | its update | last update |")
        L.append("|---|---:|---:|---:|---:|")
        for m, g in gains.items():
            L.append(f"| {'LRS' if m == 'lrs' else DLABEL[m]} | {g['imitation']:.3f} | {g['kept']:.3f} | "
                     f"{g['kept_update']} | {g['last']:.3f} (update {g['last_update']}) |")
        if "lrs" not in gains:
            L.append("\nLRS's checkpoint is the shipped one, reused from the full run (`python -m policy.reproduce`), "
                     "whose training log is not in this stage's run directory.")
        L.append("")
    L.append(f"DLRS ahead of LRS by more than 2 SE in {wins} of {len(MODES) * len(EDGES)} configurations. The shipped "
             "policy changes only if DLRS is better on held-out reward and holds the false-hit bound on the benchmark "
             "workloads (docs/policy.md, DLRS).\n")
    if run is not None and (Path(run) / "dlrs-curves.png").exists():
        L.append("![img/policy-dlrs.png](img/policy-dlrs.png)\n")
    L.append(END)
    return L


def plot(run: Path, dest: Path) -> None:
    """Validation reward during training (best serving rule, validation split) of LRS and the DLRS family."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in ("lrs", *DIFFUSION):
        p = run / f"{m}-w{W:g}.csv"
        if not p.exists():
            continue
        with open(p) as f:
            rows = [r for r in csv.DictReader(f) if r["val_reward"]]
        ax.plot([float(r["env_steps"]) for r in rows], [float(r["val_reward"]) for r in rows], marker="o",
                lw=2.5 if m == "lrs" else 1, label="LRS" if m == "lrs" else DLABEL[m])
    ax.set_title("w = 0.1: validation reward during training (best serving rule)")
    ax.set_xlabel("agent decisions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=90)
    fig.savefig(run / "dlrs-curves.png", dpi=90)
    plt.close(fig)


def replace_section(doc: Path, lines: list[str]) -> None:
    """Put the section between the markers of ``doc`` (replacing an older one), else before "## Plots",
    else at the end."""
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    elif "\n## Plots\n" in text:
        head, tail = text.split("\n## Plots\n", 1)
        text = head + "\n" + block + "\n\n## Plots\n" + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    doc.write_text(text)


def existing_section(doc: Path) -> str | None:
    """The DLRS block of ``doc`` as it stands (``policy.report`` keeps it when it rewrites the rest)."""
    if not doc.exists():
        return None
    text = doc.read_text()
    if BEGIN in text and END in text:
        return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return None
