"""One command: build the data, train every learned method for every w, tune the static threshold,
calibrate LRS, evaluate everything on the test split, export the shipped policy, write the docs.

    python -m policy.reproduce                 # full run (docs/policy-results.md, docs/img/policy-*.png,
                                               #  velo_proxy/policies/lrs-default.{onnx,json,pt})
    python -m policy.reproduce --quick         # minutes: tiny data, few updates, nothing shipped
    python -m policy.reproduce --data-dir DIR  # datasets elsewhere (env VELO_DATASETS_DIR; default ../shared/data)
    python -m policy.reproduce --dlrs          # only the DLRS stage (policy/reproduce_dlrs.py): DLRS and its
                                               #  variants beside LRS at w = 0.1; a full run ends with it
    VELO_EMBEDDER=multilingual-e5-small python -m policy.reproduce --no-dlrs
                                               # the multilingual embedder's policy (docs/policy-results-
                                               #  multilingual-e5-small.md, velo_proxy/policies/lrs-multilingual-
                                               #  e5-small.*); answers are judged in MiniLM's space either way

Training is per w (w in {0.01, 0.1, 1}); learned policies are trained with N = 3 agents in the nearest
edge mode and evaluated, unchanged, for N = 2..5 in both modes (the actor is decentralised; only the
training critic depends on N).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import pickle
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from velo_proxy.calibration import DELTAS, NEVER_SERVE, calibration_record, delta_key

REPO = Path(__file__).resolve().parent.parent
WS = (0.01, 0.1, 1.0)
EDGES = (2, 3, 4, 5)
MODES = ("nearest", "all")
LEARNED = ("lrs", "t-mappo", "g-mappo", "mappo")
LABEL = {"lrs": "LRS", "t-mappo": "T-MAPPO", "g-mappo": "G-MAPPO", "mappo": "MAPPO"}
#: The version each shipped policy (velo_proxy.policy.SHIPPED_POLICIES' stems) is exported under; bump on retraining.
POLICY_VERSIONS = {"lrs-default": "lrs-default-6", "lrs-multilingual-e5-small": "lrs-multilingual-e5-small-1"}
SEEDS = tuple(range(2024, 2034))  # ten test streams: the paired comparison needs a standard error
#: Validation streams on which the static threshold and LRS's serving thresholds are chosen: as many as
#: the test has, since the gain of serving semantic hits at w = 0.1 is about one stream's noise.
CAL_SEEDS = tuple(range(777, 787))


def _dataset(spec, out: Path):
    from .data import build_dataset, data_dir, dataset_key, load_embedder

    embedder = load_embedder()  # VELO_EMBEDDER: another embedder's vectors are another dataset
    key = dataset_key(spec, str(data_dir().resolve()), embedder.id)
    path = out / f"dataset-{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            data = pickle.load(f)
    else:
        data = build_dataset(spec, embedder)
        with open(path, "wb") as f:
            pickle.dump(data, f)
    # the installed verifier's scores of the hits it would verify (hit features; disk-cached per pair)
    from .pair_scores import attach_installed_verifier

    scores = attach_installed_verifier(data)
    vkey = hashlib.sha256(scores.verifier_key.encode()).hexdigest()[:8]
    scored = out / f"dataset-{key}-verifier-{vkey}.pkl"
    with open(scored, "wb") as f:
        pickle.dump(data, f)
    return data, scored


def _train_job(args):
    data_path, method, w, tcfg_kw, out = args
    import torch

    from .networks import make_actor  # noqa: F401
    from .sim import SimConfig
    from .train import TrainConfig, actor_meta, save_actor, train, verifier_sha256_of

    with open(data_path, "rb") as f:
        data = pickle.load(f)
    torch.set_num_threads(1)
    sim = SimConfig()
    cfg = TrainConfig(method=method, sim=replace(sim, qos=replace(sim.qos, w=w)), **tcfg_kw)
    t0 = time.time()
    actor, _ = train(data, cfg, log_csv=out / f"{method}-w{w:g}.csv", progress=True)
    save_actor(actor, out / f"{method}-w{w:g}.pt", actor_meta(method, dim=data.dim, top_p=cfg.sim.top_p,
                                                              embedder_id=data.embedder_id, config=asdict(cfg),
                                                              verifier_sha256=verifier_sha256_of(data)))
    return method, w, time.time() - t0


def calibrate_actor(data, actor, val_cfg, eval_steps: int) -> dict:
    """The serving rule's calibration on validation (the ``velo_calibration`` metadata, docs/policy.md):
    candidate thresholds are quantiles of P(A) on the actor's own validation decisions; each candidate
    rule runs on validation (``CAL_SEEDS``) — its reward gives ``reward_threshold``, its false hits the
    threshold per delta."""
    from .baselines import NeuralPolicy
    from .evaluate import calibrate_rules, collect_calibration, evaluate_seeds, quantile_thresholds

    rec = collect_calibration(data, NeuralPolicy(actor, "LRS"), val_cfg, eval_steps, seed=CAL_SEEDS[0])
    cands = sorted({NEVER_SERVE, *quantile_thresholds(rec["p_a"], [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999])})
    scores = {t: evaluate_seeds(data, NeuralPolicy(actor, "LRS", tau=t), val_cfg, eval_steps, CAL_SEEDS) for t in cands}
    tau_r = max(scores, key=lambda t: scores[t]["reward"])
    taus, cal_table = calibrate_rules(scores, DELTAS)
    return calibration_record(
        taus, default_delta=0.02,
        reward_threshold_rule="same rule with tau = reward_threshold: the reward-maximising tau on validation",
        w=val_cfg.qos.w,
        false_hit_rate="wrong cache answers / all cache answers (exact tier included), one-sided 95 % Wilson "
                       "upper bound on validation <= delta",
        validation=cal_table, reward_threshold=float(tau_r))


def _methods(actors, w, threshold, taus):
    from .baselines import Greedy, GreedyLLM, NeuralPolicy, Oracle, RandomPolicy, StaticThreshold

    tau_r, tau_d = taus
    ms = [NeuralPolicy(actors[("lrs", w)], "LRS", tau=tau_r), NeuralPolicy(actors[("lrs", w)], "LRS (δ=0.02)", tau=tau_d),
          NeuralPolicy(actors[("lrs", w)], "LRS (argmax)")]
    ms += [NeuralPolicy(actors[(m, w)], LABEL[m]) for m in LEARNED[1:]]
    ms += [Greedy(0.1), Greedy(0.3), Greedy(0.5), GreedyLLM(), RandomPolicy(0), StaticThreshold(threshold), Oracle()]
    return ms


def _eval_job(args):
    data_path, out, w, n, mode, threshold, taus, steps, seeds, qos_kw, key = args
    import torch

    from .evaluate import evaluate_seeds
    from .sim import SimConfig
    from .train import load_actor

    torch.set_num_threads(1)
    with open(data_path, "rb") as f:
        data = pickle.load(f)
    actors = {(m, w): load_actor(out / f"{m}-w{w:g}.pt")[0] for m in LEARNED}
    base = SimConfig()
    cfg = replace(base, n_agents=n, mode=mode, split="test", qos=replace(base.qos, w=w, **qos_kw))
    st = steps
    return key, {p.name: evaluate_seeds(data, p, cfg, st, seeds) for p in _methods(actors, w, threshold, taus)}


def _dlrs_stage(data, data_path, out, tkw, eval_steps, jobs, *, train, ship, say) -> None:
    from velo_proxy.policy import shipped_policy_stem

    from .report import report_names
    from .reproduce_dlrs import plot, replace_section, run_stage, section

    res = run_stage(data=data, data_path=data_path, out=out, tkw=tkw, eval_steps=eval_steps, jobs=jobs,
                    train=train, say=say)
    doc_name, prefix = report_names(shipped_policy_stem(data.embedder_id))
    doc = (REPO / "docs" / doc_name) if ship else out / "policy-results-dlrs.md"
    plot(out, (REPO / "docs" / "img" / f"{prefix}-dlrs.png") if ship else out / "policy-dlrs.png")
    replace_section(doc, section(res, run=out))
    say(f"dlrs stage: wrote {doc} in {res['t_total'] / 60:.1f} min")


def _fmt(x, nd=3):
    return f"{x:.{nd}f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny data and few updates (smoke run; ships nothing)")
    ap.add_argument("--updates", type=int, default=None, help="PPO updates per training run")
    ap.add_argument("--eval-steps", type=int, default=None, help="test steps per evaluation")
    ap.add_argument("--jobs", type=int, default=2, help="training processes in parallel (1 torch thread each)")
    ap.add_argument("--out", type=Path, default=None,
                    help="run directory (default ~/.cache/velo-proxy/sim/runs/full, full-<VELO_EMBEDDER> for another embedder)")
    ap.add_argument("--skip-train", action="store_true", help="reuse checkpoints in --out")
    ap.add_argument("--no-ship", action="store_true", help="do not write velo_proxy/policies or docs")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="datasets directory, laid out like ../shared/data [env VELO_DATASETS_DIR; default ../shared/data]")
    ap.add_argument("--dlrs", action="store_true",
                    help="only the DLRS stage: DLRS and its variants beside LRS at w = 0.1 (trains what is missing in --out)")
    ap.add_argument("--no-dlrs", action="store_true", help="a full run without the DLRS stage at its end")
    a = ap.parse_args(argv)
    import os

    from .data import DATASETS_ENV, DatasetsMissing, data_dir

    if a.data_dir is not None:
        os.environ[DATASETS_ENV] = str(a.data_dir)  # the training processes read it too
    try:
        datasets = data_dir()
    except DatasetsMissing as exc:
        raise SystemExit(f"policy.reproduce: {exc}") from None

    import torch

    from .baselines import NeuralPolicy, StaticThreshold
    from .data import DataSpec, cache_dir
    from .evaluate import evaluate_seeds
    from .export import export_onnx, parity
    from .sim import SimConfig
    from velo_proxy.policy import shipped_policy_stem

    from .report import report_names
    from .train import load_actor, verifier_sha256_of

    torch.set_num_threads(1)
    t_start = time.time()
    quick = a.quick
    spec = DataSpec.tiny() if quick else DataSpec()
    updates = a.updates or (8 if quick else 80)
    eval_steps = a.eval_steps or (150 if quick else 500)
    from velo_proxy.settings import DEFAULT_EMBEDDER_NAME, Settings

    embedder_name = Settings().embedder  # another embedder's run keeps its own checkpoints
    run_name = ("quick" if quick else "full") + ("" if embedder_name == DEFAULT_EMBEDDER_NAME else f"-{embedder_name}")
    out = a.out or cache_dir() / "runs" / run_name
    out.mkdir(parents=True, exist_ok=True)
    ship = not (quick or a.no_ship)
    log = open(out / "reproduce.log", "a")

    def say(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    data, data_path = _dataset(spec, out.parent)
    say(f"datasets directory {datasets}")
    say(f"dataset: {data.q_emb.shape[0]} requests, {len(data.c_members)} clusters, embedder {data.embedder_id}, "
        f"LLM answer distance {data.llm_distance:.3f}; {len(data.pair_scores.table)} verifier pairs "
        f"({data.pair_scores.verifier_key})")

    # ---- training ----
    tkw = {"updates": updates}
    if quick:
        tkw.update(rollout_steps=64, eval_every=4, eval_steps=60, demo_steps=300, neighbour_demos=600)
    if a.dlrs:
        from .reproduce_dlrs import DIFFUSION

        _dlrs_stage(data, data_path, out, tkw, eval_steps, a.jobs, train=() if a.skip_train else ("lrs", *DIFFUSION),
                    ship=ship, say=say)
        return
    jobs = [(data_path, m, w, tkw, out) for w in WS for m in LEARNED]
    if not a.skip_train:
        if a.jobs > 1:
            with mp.get_context("spawn").Pool(a.jobs) as pool:
                for m, w, dt in pool.imap_unordered(_train_job, jobs):
                    say(f"trained {m} w={w:g} in {dt:.0f}s")
        else:
            for j in jobs:
                m, w, dt = _train_job(j)
                say(f"trained {m} w={w:g} in {dt:.0f}s")
    actors = {(m, w): load_actor(out / f"{m}-w{w:g}.pt")[0] for w in WS for m in LEARNED}
    t_train = time.time() - t_start
    if a.skip_train and (out / "train_time.txt").exists():
        t_train = float((out / "train_time.txt").read_text())
    else:
        (out / "train_time.txt").write_text(f"{t_train:.1f}\n")

    base = SimConfig()

    def cfg_for(w, n=3, mode="nearest", split="test", **qos):
        return replace(base, n_agents=n, mode=mode, split=split, qos=replace(base.qos, w=w, **qos))

    # ---- static threshold chosen on validation, calibration of LRS on validation ----
    thresholds, calibrations = {}, {}
    grid = [round(x, 2) for x in np.arange(0.70, 0.99, 0.02)] + [0.99]
    for w in WS:
        scores = {t: evaluate_seeds(data, StaticThreshold(t), cfg_for(w, split="val"), eval_steps, CAL_SEEDS)["reward"]
                  for t in grid}
        thresholds[w] = max(scores, key=scores.get)
        calibrations[w] = calibrate_actor(data, actors[("lrs", w)], cfg_for(w, split="val"), eval_steps)
        say(f"w={w:g}: static threshold {thresholds[w]:.2f} (val), LRS reward threshold "
            f"{calibrations[w]['reward_threshold']:.4f}, calibration {calibrations[w]['thresholds']}")

    def taus_of(w):
        return (calibrations[w]["reward_threshold"], calibrations[w]["thresholds"]["0.02"])

    def methods(w):
        return _methods(actors, w, thresholds[w], taus_of(w))

    # ---- test evaluation: every w x N x mode (parallel over configurations) ----
    results = {}
    cfgs = [(w, n, mode) for w in WS for n in EDGES for mode in MODES]
    ejobs = [(data_path, out, w, n, mode, thresholds[w], taus_of(w), eval_steps, SEEDS, {},
              (w, n, mode)) for w, n, mode in cfgs]
    # sensitivity of the QoS model (policies unchanged, w = 0.1, N = 3, nearest)
    moves = [("paper edge delay (edge_s = 0.8 s)", {"edge_s": 0.8}), ("C relevant weight 0.3", {"c_relevant_weight": 0.3}),
             ("C relevant weight 0.7", {"c_relevant_weight": 0.7}), ("C irrelevant weight 0.0", {"c_irrelevant_weight": 0.0}),
             ("C irrelevant weight 0.3", {"c_irrelevant_weight": 0.3}), ("augment delay 0.5 s", {"augment_s": 0.5}),
             ("LLM answer distance 0.4", {"llm_distance": 0.4}), ("LLM answer distance 0.8", {"llm_distance": 0.8})]
    ejobs += [(data_path, out, 0.1, 3, "nearest", thresholds[0.1], taus_of(0.1), eval_steps,
               SEEDS[:2], kw, ("sens", label)) for label, kw in moves]
    sens_res = {}
    with mp.get_context("spawn").Pool(max(1, a.jobs)) as pool:
        for key, res in pool.imap_unordered(_eval_job, ejobs):
            if key[0] == "sens":
                sens_res[key[1]] = {name: m["reward"] for name, m in res.items()}
                say(f"sensitivity: {key[1]}")
                continue
            for name, m in res.items():
                results[(*key, name)] = m
            say(f"evaluated w={key[0]:g} N={key[1]} {key[2]}")
    sens = [(label, sens_res[label]) for label, _ in moves]

    # ---- calibration check on test ----
    cal_rows = []
    for d in DELTAS:
        tau = calibrations[0.1]["thresholds"][delta_key(d)]
        m = evaluate_seeds(data, NeuralPolicy(actors[("lrs", 0.1)], f"LRS δ={d:g}", tau=tau), cfg_for(0.1), eval_steps, SEEDS)
        cal_rows.append((d, tau, m))

    # ---- export the shipped policy ----
    parity_diff = None
    stem = shipped_policy_stem(data.embedder_id)  # one shipped policy per embedder
    onnx_path = (REPO / "velo_proxy" / "policies" / f"{stem}.onnx") if ship else out / "lrs-w0.1.onnx"
    actor = actors[("lrs", 0.1)]
    embedder_env = os.environ.get("VELO_EMBEDDER")
    command = ((f"VELO_EMBEDDER={embedder_env} " if embedder_env else "") + "python -m policy.reproduce"
               + (" --quick" if quick else ""))
    meta = export_onnx(actor, onnx_path, dim=data.dim, top_p=base.top_p, embedder_id=data.embedder_id,
                       policy_version=POLICY_VERSIONS[stem], calibration=calibrations[0.1],
                       verifier_sha256=verifier_sha256_of(data),
                       extra={"velo_training_command": command, "velo_w": str(0.1)})
    parity_diff = parity(actor, onnx_path, dim=data.dim, top_p=base.top_p)
    res01 = results[(0.1, 3, "nearest", "LRS (δ=0.02)")]
    sidecar = {**{k: v for k, v in meta.items()}, "velo_calibration": calibrations[0.1], "training_command": command,
               "parity_max_abs_diff": parity_diff, "test_metrics_w0.1_n3_nearest": res01,
               "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}
    onnx_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=float) + "\n")
    if ship:  # the torch checkpoint next to it: `velo-proxy retrain` fine-tunes from it, on these texts
        import shutil

        from .data import retrain_spec, write_snapshot

        shutil.copyfile(out / "lrs-w0.1.pt", onnx_path.with_suffix(".pt"))
        say(f"wrote {write_snapshot(retrain_spec(spec))}")
    say(f"exported {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB), parity {parity_diff:.1e}")

    total = time.time() - t_start + (t_train if a.skip_train else 0.0)
    with open(out / "results.pkl", "wb") as f:
        pickle.dump({"results": results, "thresholds": thresholds, "calibrations": calibrations, "cal_rows": cal_rows,
                     "sens": sens, "t_train": t_train, "t_total": total, "updates": updates, "eval_steps": eval_steps}, f)
    if ship:
        from .report import write_report

        write_report(REPO, out, data, results, thresholds, calibrations, cal_rows, sens, meta, parity_diff,
                     t_train=t_train, t_total=total, updates=updates, eval_steps=eval_steps, stem=stem, command=command)
        say(f"wrote docs/{report_names(stem)[0]} and its plots")
    if not a.no_dlrs:  # reuses lrs-w0.1.pt from above; trains the diffusion actors unless --skip-train finds them
        from .reproduce_dlrs import DIFFUSION

        _dlrs_stage(data, data_path, out, tkw, eval_steps, a.jobs, train=() if a.skip_train else DIFFUSION,
                    ship=ship, say=say)
    lrs = results[(0.1, 3, "nearest", "LRS")]["reward"]
    best = max((v["reward"], k[3]) for k, v in results.items()
               if k[:3] == (0.1, 3, "nearest") and not k[3].startswith("LRS") and k[3] != "Oracle")
    say(f"w=0.1 N=3 nearest: LRS {lrs:.3f} vs best baseline {best[1]} {best[0]:.3f}; total {total / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
