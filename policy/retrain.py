"""Retrain from what the proxies experienced and judged, and publish only what is better.

    velo-proxy retrain --redis-url redis://... --policy-dir /var/lib/velo/policies
    velo-proxy retrain --labels DATA_DIR/judged/labels.jsonl --policy-dir DIR --stages verifier

Two stages (``--stages``, default both):

- verifier: the pair verifier's output head and thresholds, refitted on the judged pairs
  (``policy.retrain_verifier``; labels from ``--labels``, else the Redis stream ``velo:labels``, else
  ``VELO_DATA_DIR/judged/labels.jsonl``); its report is the ``verifier`` key of the output;
- lrs: the LRS actor, fine-tuned on the experience streams (needs Redis); the rest of this docstring.
  Its report is the top level of the output.

The LRS stage reads top to bottom:

0. check every input before reading anything (``preflight``): Redis answers, the policy directory is
   writable, the checkpoint to start from, the embedder's files, the simulator's texts (the snapshot the
   package carries, ``policy/snapshot``, so no datasets directory is needed) and a writable cache; a
   misconfigured job fails at once, naming the setting, instead of the day the first decisions arrive;
1. read the experience streams of every edge agent (``velo:experience:*``; centralised training) and
   join each decision with the rewards that arrived for it (shadow checks, feedback);
2. start from the current policy's weights (the published version's ``.pt``, else the shipped one);
3. fine-tune the actor on two signals: the logged decisions, off-policy (a PPO-style clipped surrogate
   whose ratio is new probability / logged probability, so exploration and older policies are
   corrected for), and fresh expert demonstrations from the simulator's training split (the same
   anchor as Algorithm 1, so a small or skewed log cannot drag the policy away from what it knew);
4. evaluate candidate and current on the simulator's test split and on the logged data
   (self-normalised importance sampling of the serving rule);
5. publish (calibrated, exported, atomically) only when the candidate is at least as good on the logs
   and better on the simulator; otherwise keep the current version and say why.

Rewards of logged decisions (Eq. 11, w = phi2 / phi1): r = phi1 * q - phi2 * d with the logged delay
d; q comes from the decision's reward events (the mean if several). A forward (B) has no reference
answer in production: its q is the simulator's mean satisfaction of B (``b_satisfaction``, measured
on the validation split at the start of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from velo_proxy import features as F
from velo_proxy.experience import decode_observation, read_all_streams
from velo_proxy.calibration import calibration_record, serve_threshold
from velo_proxy.policy import DEFAULT_POLICY_EMBEDDER_ID, PolicyMismatch, default_policy_path
from velo_proxy.policy_dir import PolicyDirectory

from .baselines import GreedyLLM, NeuralPolicy
from .data import DataSpec, retrain_spec
from .evaluate import calibrate, collect_calibration, evaluate
from .export import export_onnx, parity
from .sim import SimConfig
from .pair_scores import attach_installed_verifier
from .retrain_verifier import VerifierRetrainConfig
from .train import collect_demos, load_actor, regret_loss, save_actor

log = logging.getLogger("policy.retrain")
ACTION_INDEX = {a: i for i, a in enumerate(F.ACTIONS)}


@dataclass
class RetrainConfig:
    """Hyperparameters and wiring of one retrain run."""

    redis_url: str
    """Redis holding the agents' experience streams."""
    policy_dir: Path
    """Where versions are published (``velo_proxy.policy_dir``); the proxies watch it."""
    w: float = 0.1
    """QoS trade-off phi2 / phi1 (Eq. 11) the policy optimises."""
    epochs: int = 30
    """Passes over (logged decisions + demonstrations)."""
    lr: float = 1e-4
    """Actor learning rate of the fine-tuning (below the from-scratch 3e-4: small steps from a good policy)."""
    clip: float = 0.2
    """PPO clip of the importance ratio."""
    logged_coef: float = 1.0
    """Weight of the off-policy loss on logged decisions."""
    demo_coef: float = 1.0
    """Weight of the imitation loss on fresh expert demonstrations."""
    demo_steps: int = 1500
    """Simulator steps of expert demonstrations (x N agents decisions)."""
    eval_steps: int = 1500
    """Simulator steps per evaluation (test split) and per calibration run (validation split)."""
    min_decisions: int = 20
    """Fewer logged decisions than this: nothing to learn from, no publication."""
    margin: float = 0.0
    """The candidate must beat the current policy's simulated reward by more than this."""
    data_spec: DataSpec = field(default_factory=DataSpec)
    """Simulator data (the same as training by default)."""
    stream: str = "clusters"
    """Simulator request stream for demonstrations, calibration and the comparison (``SimConfig.stream``:
    'clusters', the benchmark's shape, as training; or 'zipf')."""
    max_false_hit_rate: float = 0.02
    """Default delta written into the calibration."""
    seed: int = 0
    """Seed of torch and the simulator."""
    threads: int = 1
    """torch intra-op threads."""


@dataclass
class Logged:
    """The logged decisions with a reward, as arrays."""

    obs: dict[str, np.ndarray]  # the actor's four inputs, [n, ...]
    action: np.ndarray  # [n] int
    prob: np.ndarray  # [n] probability of the logged action under the logging policy
    reward: np.ndarray  # [n]
    agents: int


def read_experience(redis_url: str) -> list[dict]:
    """Decisions of every agent joined with their rewards: [{fields..., "rewards": [q, ...]}]."""
    import redis.asyncio as aioredis

    async def fetch() -> dict:
        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            return await read_all_streams(client)
        finally:
            await client.aclose()

    streams = asyncio.run(fetch())
    decisions: dict[str, dict] = {}
    rewards: dict[str, list[float]] = {}
    for entries in streams.values():
        for _, fields in entries:
            if fields.get("kind") == "decision":
                decisions[fields["request_id"]] = dict(fields)
            elif fields.get("kind") == "reward":
                rewards.setdefault(fields["request_id"], []).append(float(fields["q"]))
    out = []
    for request_id, fields in decisions.items():
        fields["rewards"] = rewards.get(request_id, [])
        out.append(fields)
    return out


def logged_dataset(decisions: list[dict], *, qos, b_satisfaction: float, embedder_id: str) -> Logged | None:
    """Decisions whose reward is known (a reward event, or B with the simulator's prior), logged by proxies
    that embed with ``embedder_id``."""
    rows = []
    for d in decisions:
        if int(d["k"]) != F.K:
            continue  # logged under another feature contract (an older proxy): its observations do not fit
        if d.get("embedder") != embedder_id:
            # another embedder's vectors (same size, another space), or a proxy that did not say which
            continue
        action = ACTION_INDEX[d["action"]]
        if d["rewards"]:
            q = float(np.mean(d["rewards"]))
        elif action == ACTION_INDEX["B"]:
            q = b_satisfaction
        else:
            continue  # a served answer nobody checked: no reward to learn from
        obs = decode_observation(d["obs"], dim=int(d["dim"]), top_p=int(d["top_p"]), k=int(d["k"]))
        rows.append((obs, action, float(d["prob"]), float(qos.reward(q, float(d["delay_s"])))))
    if not rows:
        return None
    stacked = F.stack_observations([r[0] for r in rows])
    return Logged(obs=stacked, action=np.array([r[1] for r in rows]), prob=np.array([r[2] for r in rows], np.float32),
                  reward=np.array([r[3] for r in rows], np.float32),
                  agents=len({d["agent"] for d in decisions}))


def logged_loss(actor: torch.nn.Module, logged: Logged, advantage: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped off-policy surrogate: ratio = pi_new(a|s) / pi_logged(a|s)."""
    logits = actor(*(torch.from_numpy(logged.obs[k]) for k in F.INPUT_NAMES))
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.from_numpy(logged.action)[:, None]).squeeze(1)
    ratio = torch.exp(logp - torch.log(torch.from_numpy(np.clip(logged.prob, 1e-3, 1.0))))
    return -torch.min(ratio * advantage, torch.clamp(ratio, 1 - clip, 1 + clip) * advantage).mean()


def snips_value(actor: torch.nn.Module, logged: Logged, tau: float) -> float:
    """Self-normalised importance-sampling estimate of the serving rule's reward on the logs."""
    from .baselines import decide

    with torch.no_grad():
        p = torch.softmax(actor(*(torch.from_numpy(logged.obs[k]) for k in F.INPUT_NAMES)), dim=-1).numpy()
    chosen = decide(p, tau)
    weight = (chosen == logged.action).astype(np.float64) / np.clip(logged.prob, 1e-3, 1.0)
    return float((weight * logged.reward).sum() / weight.sum()) if weight.sum() > 0 else float("nan")


def current_checkpoint(directory: PolicyDirectory, embedder_id: str = DEFAULT_POLICY_EMBEDDER_ID) -> tuple[Path, str]:
    """Where fine-tuning starts: the published version's checkpoint, else the shipped policy's for
    ``embedder_id`` (``PolicyMismatch`` when the package ships none for it)."""
    published = directory.checkpoint()
    if published is not None:
        return published
    shipped = default_policy_path(embedder_id).with_suffix(".pt")
    return shipped, shipped.stem


def configured_embedder_id() -> str:
    """The id of the embedder the proxy is configured with (VELO_EMBEDDER / VELO_EMBEDDER_DIR)."""
    from velo_proxy.settings import Settings

    return _embedder_id(Settings().embedder_dir)


@functools.lru_cache(maxsize=4)
def _embedder_id(model_dir: Path) -> str:
    # one load per directory and job: both stages and the preflight ask, and e5 takes ~2 s and ~400 MB to load
    from velo_proxy.embedder import OnnxEmbedder

    return OnnxEmbedder(model_dir).id


class RetrainInputError(RuntimeError):
    """Something the run reads is missing or unusable; the message names the setting."""


def preflight(cfg: RetrainConfig) -> dict:
    """Check every file, directory and service the run reads or writes, before it reads anything.
    Returns what was found; raises ``RetrainInputError`` naming the setting otherwise."""
    import redis

    from velo_proxy.settings import Settings

    from .data import DatasetsMissing, answer_judge_dir, cache_dir, collect_for

    inputs: dict = {}
    try:
        redis.Redis.from_url(cfg.redis_url, socket_timeout=10, socket_connect_timeout=10).ping()
    except Exception as exc:  # noqa: BLE001
        raise RetrainInputError(f"Redis at --redis-url / VELO_REDIS_URL does not answer: {exc}") from exc
    inputs["redis"] = "ok"
    root = Path(cfg.policy_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise RetrainInputError(f"policy directory {root} (--policy-dir / VELO_POLICY_DIR) is not writable: {exc}") from exc
    inputs["policy_dir"] = str(root)
    embedder_dir = Settings().embedder_dir
    missing = [name for name in ("model.onnx", "tokenizer.json") if not (embedder_dir / name).is_file()]
    if missing:
        raise RetrainInputError(f"embedder {embedder_dir} (VELO_EMBEDDER_DIR) lacks {', '.join(missing)}: run "
                                "`velo-proxy models export`, or use the image's train target, which carries it")
    inputs["embedder_dir"] = str(embedder_dir)
    judge_dir = answer_judge_dir()  # the simulator judges answers in all-MiniLM-L6-v2's space, whatever the embedder
    if not (judge_dir / "model.onnx").is_file():
        raise RetrainInputError(f"the simulator's answer judge {judge_dir} lacks model.onnx: run `velo-proxy models "
                                "export` (the default embedder), or use the image's train target, which carries it")
    inputs["answer_judge_dir"] = str(judge_dir)
    try:
        checkpoint, version = current_checkpoint(PolicyDirectory(root), configured_embedder_id())
    except PolicyMismatch as exc:
        raise RetrainInputError(f"no checkpoint to start from: {exc}") from None
    if not checkpoint.is_file():
        raise RetrainInputError(f"no checkpoint to start from: {checkpoint} is missing (the package's default policy)")
    inputs["checkpoint"] = {"path": str(checkpoint), "version": version}
    verifier_dir = Settings(policy="learned").verifier_dir  # the learned policy's features are its verifier's scores
    missing = [name for name in ("model.onnx", "tokenizer.json", "velo_verifier.json") if not (verifier_dir / name).is_file()]
    if missing:
        raise RetrainInputError(f"pair verifier {verifier_dir} (VELO_VERIFIER_DIR) lacks {', '.join(missing)}: run "
                                "`velo-proxy models export`, or use the image's train target, which carries it")
    inputs["verifier_dir"] = str(verifier_dir)
    try:
        collected, source = collect_for(retrain_spec(cfg.data_spec))
    except DatasetsMissing as exc:
        raise RetrainInputError(f"simulator data: {exc}") from exc
    inputs["simulator_data"] = {"source": source, "clusters": len(collected["clusters"])}
    try:
        cache = cache_dir()
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise RetrainInputError(f"simulator cache (VELO_SIM_CACHE, default $HOME/.cache/velo-proxy/sim) is not "
                                f"writable: {exc}") from exc
    inputs["cache_dir"] = str(cache)
    return inputs


def load_data(spec: DataSpec):
    """The simulator dataset of ``spec`` (texts from ``collect_for``: the package's snapshot, else the
    datasets directory), embedded and pickled under the simulator cache; and where its texts came from."""
    from .data import build_dataset, cache_dir, collect_for, dataset_key, load_embedder

    collected, source = collect_for(spec)
    embedder = load_embedder()
    path = cache_dir() / "runs" / f"dataset-{dataset_key(spec, source, embedder.id)}.pkl"
    if path.exists():
        with open(path, "rb") as handle:
            return pickle.load(handle), source
    data = build_dataset(spec, embedder, progress=False, collected=collected)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle)
    return data, source


def run(cfg: RetrainConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    directory = PolicyDirectory(cfg.policy_dir)
    report: dict = {"published": False}

    # 0. every input, before anything is read
    report["inputs"] = preflight(cfg)

    # 1. experience of all agents
    decisions = read_experience(cfg.redis_url)
    report["decisions"] = len(decisions)
    if len(decisions) < cfg.min_decisions:
        report["reason"] = f"only {len(decisions)} logged decisions (< {cfg.min_decisions})"
        return report

    # 2. the current policy and the simulator
    embedder_id = configured_embedder_id()
    checkpoint, current_version = current_checkpoint(directory, embedder_id)
    current, meta = load_actor(checkpoint)
    candidate, _ = load_actor(checkpoint)
    # The training-only labelled pairs feed neighbourhood demonstrations, which retraining does not use:
    # without them the streams are the same and ~48k fewer texts are embedded on a fresh node.
    data, report["simulator_data"] = load_data(retrain_spec(cfg.data_spec))
    # the verifier's scores are hit features (since feature version 2): the same verifier the proxies run
    report["verifier_pairs"] = len(attach_installed_verifier(data, progress=False).table)
    sim_cfg = SimConfig(stream=cfg.stream)
    sim_cfg = replace(sim_cfg, qos=replace(sim_cfg.qos, w=cfg.w), seed=cfg.seed)
    qos = sim_cfg.qos
    b_satisfaction = evaluate(data, GreedyLLM(), replace(sim_cfg, split="val"), cfg.eval_steps // 3)["satisfaction"]
    logged = logged_dataset(decisions, qos=qos, b_satisfaction=b_satisfaction, embedder_id=embedder_id)
    report.update(current=current_version, b_satisfaction=b_satisfaction, embedder=embedder_id,
                  decisions_of_other_embedders=sum(d.get("embedder") != embedder_id for d in decisions),
                  logged_with_reward=0 if logged is None else len(logged.action),
                  agents=0 if logged is None else logged.agents)
    if logged is None or len(logged.action) < cfg.min_decisions:
        report["reason"] = "too few logged decisions with a reward"
        return report

    # 3. fine-tune: off-policy loss on the logs + imitation of fresh demonstrations
    demos = collect_demos(data, replace(sim_cfg, split="train", seed=cfg.seed + 11), cfg.demo_steps, 0.2)
    reward = torch.from_numpy(logged.reward)
    advantage = (reward - reward.mean()) / (reward.std() + 1e-6)
    optimiser = torch.optim.Adam(candidate.parameters(), lr=cfg.lr, eps=1e-5)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_demo = demos[-1].shape[0]
    candidate.train()
    for _ in range(cfg.epochs):
        idx = torch.randperm(n_demo, generator=generator)[: max(256, len(logged.action))]
        loss = cfg.logged_coef * logged_loss(candidate, logged, advantage, cfg.clip)
        loss = loss + cfg.demo_coef * regret_loss(candidate(*(x[idx] for x in demos[:4])), demos[4][idx])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(candidate.parameters(), 0.5)
        optimiser.step()
    candidate.eval()

    # 4. evaluate both, each with its own calibration for the operator's delta
    def calibrated(actor) -> tuple[float, dict]:
        cal = collect_calibration(data, NeuralPolicy(actor, "x"), replace(sim_cfg, split="val"), cfg.eval_steps)
        thresholds = calibrate(cal["p_a"], cal["relevant"])
        # the tau the proxies will read from this table for the operator's bound
        return serve_threshold({"thresholds": thresholds}, cfg.max_false_hit_rate), thresholds

    results = {}
    for name, actor in (("current", current), ("candidate", candidate)):
        tau, thresholds = calibrated(actor)
        sim_result = evaluate(data, NeuralPolicy(actor, name, tau=tau), replace(sim_cfg, split="test"), cfg.eval_steps)
        results[name] = {"tau": tau, "thresholds": thresholds, "sim_reward": sim_result["reward"],
                         "sim_false_hit_rate": sim_result["false_hit_rate"], "sim_hit_rate": sim_result["hit_rate"],
                         "logged_value": snips_value(actor, logged, tau)}
    report["evaluation"] = results
    better_sim = results["candidate"]["sim_reward"] > results["current"]["sim_reward"] + cfg.margin
    logs_ok = not (results["candidate"]["logged_value"] < results["current"]["logged_value"] - 1e-6)
    if not (better_sim and logs_ok):
        report["reason"] = ("not better on the simulator's test split" if not better_sim
                            else "worse than the current policy on the logged data")
        return report

    # 5. publish: export with calibration, parity check, atomic write of the version and CURRENT
    version = time.strftime("lrs-%Y%m%dT%H%M%SZ", time.gmtime())
    calibration = calibration_record(results["candidate"]["thresholds"], default_delta=cfg.max_false_hit_rate,
                                     w=cfg.w, retrained_from=current_version)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, pt_path = Path(tmp) / f"{version}.onnx", Path(tmp) / f"{version}.pt"
        export_onnx(candidate, onnx_path, dim=meta["dim"], top_p=meta["top_p"], embedder_id=meta["embedder_id"],
                    policy_version=version, calibration=calibration, verifier_sha256=meta.get("verifier_sha256"))
        report["parity"] = parity(candidate, onnx_path, dim=meta["dim"], top_p=meta["top_p"])
        if report["parity"] > 1e-5:
            report["reason"] = f"export parity {report['parity']:.2e} > 1e-5"
            return report
        save_actor(candidate, pt_path, {**meta, "retrained_from": current_version})
        directory.publish(onnx_path.read_bytes(), version=version, checkpoint=pt_path.read_bytes(), info={
            "published_at": time.time(), "retrained_from": current_version, "evaluation": results})
    report.update(published=True, version=version, seconds=round(time.time() - t0, 1))
    return report


def main(argv: list[str] | None = None) -> int:
    from velo_proxy.settings import Settings

    settings = Settings()
    parser = argparse.ArgumentParser(prog="velo-proxy retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=settings.redis_url, help="[env VELO_REDIS_URL]")
    parser.add_argument("--policy-dir", type=Path, default=settings.policy_dir, help="[env VELO_POLICY_DIR]")
    parser.add_argument("--w", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=RetrainConfig.epochs)
    parser.add_argument("--eval-steps", type=int, default=RetrainConfig.eval_steps)
    parser.add_argument("--demo-steps", type=int, default=RetrainConfig.demo_steps)
    parser.add_argument("--min-decisions", type=int, default=RetrainConfig.min_decisions)
    parser.add_argument("--max-false-hit-rate", type=float, default=settings.max_false_hit_rate)
    parser.add_argument("--data-spec", default=None, help="JSON of policy.data.DataSpec fields (default: training's, "
                        "whose texts the package carries; any other spec reads the datasets directory)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="datasets directory for a non-default --data-spec [env VELO_DATASETS_DIR; default "
                        "../shared/data]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", choices=("clusters", "zipf"), default=RetrainConfig.stream,
                        help="simulator request stream (default: the benchmark-shaped one training uses)")
    parser.add_argument("--stages", choices=("all", "verifier", "lrs"), default="all",
                        help="what to retrain: the verifier's head and thresholds from the judged pairs, the LRS actor "
                        "from the experience streams, or both (default)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="judged pairs (JSONL) [default: the Redis stream velo:labels with --redis-url, else "
                        "VELO_DATA_DIR/judged/labels.jsonl]")
    parser.add_argument("--verifier-dir", type=Path, default=settings.verifier_dir, help="[env VELO_VERIFIER_DIR]")
    parser.add_argument("--min-labels", type=int, default=VerifierRetrainConfig.min_labels)
    args = parser.parse_args(argv)
    if args.policy_dir is None:
        parser.error("--policy-dir (or VELO_POLICY_DIR) is required")
    if args.stages == "lrs" and not args.redis_url:
        parser.error("the lrs stage reads the experience streams: --redis-url (or VELO_REDIS_URL) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    verifier_report = None
    if args.stages in ("all", "verifier"):
        verifier_report = verifier_stage(args, settings)
        if args.stages == "verifier":
            print(json.dumps({"verifier": verifier_report}, indent=2, default=str))
            return 0
    if not args.redis_url:
        print(json.dumps({"published": False, "reason": "no Redis (--redis-url / VELO_REDIS_URL): the lrs stage, "
                          "which reads the experience streams, was skipped", "verifier": verifier_report},
                         indent=2, default=str))
        return 0
    if args.data_dir is not None:
        import os

        from .data import DATASETS_ENV

        os.environ[DATASETS_ENV] = str(args.data_dir)
    spec = DataSpec(**json.loads(args.data_spec)) if args.data_spec else DataSpec()
    try:
        report = run(RetrainConfig(redis_url=args.redis_url, policy_dir=args.policy_dir, w=args.w, epochs=args.epochs,
                                   eval_steps=args.eval_steps, demo_steps=args.demo_steps,
                                   min_decisions=args.min_decisions, max_false_hit_rate=args.max_false_hit_rate,
                                   data_spec=spec, seed=args.seed, stream=args.stream))
    except RetrainInputError as exc:
        log.error("%s", exc)
        print(json.dumps({"published": False, "reason": str(exc), "verifier": verifier_report}, indent=2,
                         default=str))
        return 1
    print(json.dumps({**report, "verifier": verifier_report}, indent=2, default=str))
    return 0


def verifier_stage(args: argparse.Namespace, settings) -> dict:
    """Recalibrate the pair verifier on the judged pairs (``policy.retrain_verifier``); a report."""
    from velo_proxy.labels import LABELS_STREAM, read_label_file, read_label_stream

    from .retrain_verifier import run as recalibrate

    if args.labels is not None:
        if not args.labels.is_file():
            return {"published": False, "reason": f"no judged pairs at --labels {args.labels}"}
        labels, source = read_label_file(args.labels), str(args.labels)
    elif args.redis_url:
        try:
            labels, source = read_label_stream(args.redis_url), f"redis stream {LABELS_STREAM}"
        except Exception as exc:  # noqa: BLE001 - reported, the lrs stage still runs
            return {"published": False, "reason": f"Redis at --redis-url / VELO_REDIS_URL does not answer: {exc}"}
    else:
        path = settings.data_dir / "judged" / "labels.jsonl"
        if not path.is_file():
            return {"published": False, "reason": f"no judged pairs: neither --labels, --redis-url nor {path}"}
        labels, source = read_label_file(path), str(path)
    try:
        embedder_id = configured_embedder_id()  # whose judged pairs to fit on
    except Exception as exc:  # noqa: BLE001 - reported; the lrs stage's preflight names the setting and fails
        return {"published": False, "reason": f"the embedder (VELO_EMBEDDER_DIR) does not load: {exc}"}
    report = recalibrate(VerifierRetrainConfig(policy_dir=args.policy_dir, verifier_dir=args.verifier_dir,
                                               embedder_id=embedder_id,
                                               max_false_hit_rate=args.max_false_hit_rate,
                                               min_labels=args.min_labels), labels)
    return {"source": source, **report}


if __name__ == "__main__":
    raise SystemExit(main())
