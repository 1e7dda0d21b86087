"""MAPPO training (CTDE): a shared decentralised actor, a centralised critic over all agents' states,
expert demonstrations mixed in with a decaying share (Algorithm 1).

Methods: ``lrs`` = Transformer actor + demonstrations; ``t-mappo`` = Transformer, no demonstrations;
``g-mappo`` = MLP actor + demonstrations; ``mappo`` = MLP actor, no demonstrations; ``dlrs`` (and
variants) = the diffusion actor over LRS's encoder + demonstrations.

One run trains for one w (the table trains one policy per w; the actor does not take w as input).

    python -m policy.train --method lrs --w 0.1 --updates 60
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from velo_proxy import features as F

from .baselines import NeuralPolicy
from .data import SOURCES, Dataset
from .evaluate import evaluate, quantile_thresholds
from .networks import Critic, make_actor
from .ppo import Rollout, compute_gae, demo_share, immediate_advantage, ppo_policy_loss, value_loss
from .sim import EdgeSim, SimConfig

METHODS = {"lrs": ("transformer", True), "t-mappo": ("transformer", False), "g-mappo": ("mlp", True),
           "mappo": ("mlp", False)}
# DLRS (docs/policy.md, "DLRS") and the paper's variants, as we read their names: L<n> = n denoising
# steps, V<n> = noise scale n / 10 at x_T; DLRS itself is L10 at scale 1.
ARCH_OPTIONS: dict[str, dict] = {"dlrs": {"steps": 10, "noise_scale": 1.0}}
for _steps in (5, 15):
    ARCH_OPTIONS[f"dlrs-l{_steps}"] = {"steps": _steps, "noise_scale": 1.0}
for _scale in (5, 10, 15):
    ARCH_OPTIONS[f"dlrs-v{_scale}"] = {"steps": 10, "noise_scale": _scale / 10}
for _name in ARCH_OPTIONS:
    METHODS[_name] = ("diffusion", True)


def verifier_sha256_of(data) -> str | None:
    """The weights of the verifier whose scores are the dataset's hit features (None: no scores)."""
    scores = getattr(data, "pair_scores", None)
    return scores.verifier_key.split(":")[0] if scores is not None else None


def actor_meta(method: str, *, dim: int, top_p: int, embedder_id: str, **extra) -> dict:
    """What a checkpoint records to rebuild its actor (``load_actor``)."""
    return {"arch": METHODS[method][0], "arch_options": ARCH_OPTIONS.get(method, {}), "method": method,
            "dim": dim, "k": F.K, "top_p": top_p, "embedder_id": embedder_id, **extra}


@dataclass
class TrainConfig:
    """Hyperparameters of one training run."""

    method: str = "lrs"
    """lrs | t-mappo | g-mappo | mappo | dlrs (and its variants dlrs-l5, dlrs-l15, dlrs-v5, dlrs-v10,
    dlrs-v15: ``ARCH_OPTIONS``)."""
    updates: int = 80
    """PPO updates (each on one rollout)."""
    rollout_steps: int = 128
    """Simulator steps per rollout (x N agents samples)."""
    epochs: int = 4
    """PPO epochs per update."""
    minibatch: int = 128
    """Samples per gradient step."""
    lr_actor: float = 3e-4
    """Actor learning rate (paper)."""
    lr_critic: float = 1e-3
    """Critic learning rate (paper)."""
    gamma: float = 0.99
    """Discount (paper)."""
    gae_lambda: float = 0.5
    """GAE lambda. Low because an action's effect is mostly immediate (what is served now; an insert
    after B/C pays off later, within the first few dozen steps): with 0.95 the advantage sums the
    next ~20 requests' outcomes, which no action here controls (PPO's decline from the imitation is
    steeper, docs/policy.md)."""
    advantage: str = "gae"
    """What the PPO surrogate is weighted by. ``gae``: GAE over the sampled rewards with the centralised
    critic (MAPPO). ``gae-expected``: the same over the simulator's expected reward of the action taken
    (``EdgeSim.expected_action_rewards``, the expectation over the LLM's possible answers; same mean, the
    answer's draw removed). ``immediate``: Q_E(a) - sum_b pi(b) Q_E(b) from the expected action values,
    no bootstrapping (what the next request brings does not enter). Measured in docs/policy.md, Status."""
    clip: float = 0.2
    """PPO clip epsilon (paper)."""
    ent_coef: float = 0.01
    """Entropy bonus."""
    max_grad_norm: float = 0.5
    """Gradient clipping."""
    demo_start: float = 0.5
    """Algorithm 1: share of expert actions at update 0 (methods with demonstrations)."""
    demo_decay: float = 0.97
    """Algorithm 1: the share is multiplied by this after every update."""
    bc_coef: float = 2.0
    """Weight of the imitation loss (expected regret against the expert's action values), times the
    current demonstration share."""
    demo_steps: int = 6000
    """Simulator steps of expert demonstrations collected before training (x N decisions)."""
    demo_eps: float = 0.2
    """Share of random actions in the demonstration run (varied cache states; labels stay the expert's)."""
    neighbour_demos: int = 120000
    """Expert decisions on labelled semantic hits built from the neighbourhoods of the training data
    (train split and the training-only ``pairs`` split, ``collect_neighbour_demos``), added to the
    stream demonstrations."""
    demo_pretrain_epochs: int = 3
    """Behaviour-cloning epochs over the demonstrations before the first PPO update."""
    eval_every: int = 20
    """Validate (``validation_reward``: best serving rule, validation split) every this many updates and
    after the imitation; the best actor is kept."""
    eval_steps: int = 500
    """Validation steps per stream."""
    eval_streams: int = 6
    """Validation streams per checkpoint (averaged). With two, the kept checkpoint was a PPO update
    that only looked better by the streams' noise and served worse than the imitation (docs/policy.md)."""
    seed: int = 0
    """Seed of torch, the sampler and the simulator."""
    threads: int = 1
    """torch intra-op threads (the machine has 2 cores, shared)."""
    sim: SimConfig = field(default_factory=SimConfig)
    """Training simulator (split is forced to train)."""


class RunningNorm:
    """Running mean/std of rewards; the learner sees (r - mean) / std (a constant shift does not change
    the optimal policy here: episodes have a fixed length)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: np.ndarray) -> None:
        for v in np.asarray(x, dtype=np.float64).ravel():
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / max(1, self.n - 1))) if self.n > 1 else 1.0


def _to_t(batch: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(batch[k]) for k in F.INPUT_NAMES]


def train(data: Dataset, cfg: TrainConfig, *, log_csv: Path | None = None, progress: bool = True):
    """Train; returns (best actor, history rows)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    arch, use_demos = METHODS[cfg.method]
    if cfg.advantage not in ("gae", "gae-expected", "immediate"):
        raise ValueError(f"unknown advantage {cfg.advantage!r}")
    sim_cfg = replace(cfg.sim, split="train", seed=cfg.seed, reshuffle=True)
    sim = EdgeSim(data, sim_cfg)
    N, D, P, K = sim.N, data.dim, sim_cfg.top_p, F.K
    obs = sim.reset()
    S = sim.global_state(obs).shape[1]
    actor = make_actor(arch, D, K, P, **ARCH_OPTIONS.get(cfg.method, {}))
    critic = Critic(S, N)
    opt_a = torch.optim.Adam(actor.parameters(), lr=cfg.lr_actor, eps=1e-5)
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic, eps=1e-5)
    buf = Rollout.allocate(cfg.rollout_steps, N, D, P, K, S)
    exact_buf = torch.zeros(cfg.rollout_steps, N)
    immediate_buf = torch.zeros(cfg.rollout_steps, N)  # Q_E(a) - E_pi Q_E (advantage "immediate")
    regret_buf = torch.zeros(cfg.rollout_steps, N, 3)  # expert's regret of each action (imitation target)
    demos = None
    if use_demos:
        demos = collect_demos(data, replace(sim_cfg, seed=cfg.seed + 1), cfg.demo_steps, cfg.demo_eps)
        if cfg.neighbour_demos > 0:
            more = collect_neighbour_demos(data, sim_cfg, cfg.neighbour_demos, seed=cfg.seed + 2)
            demos = [torch.cat([a, b]) for a, b in zip(demos, more)]
        g0 = torch.Generator().manual_seed(cfg.seed + 7)
        n_demo = demos[-1].shape[0]
        for _ in range(cfg.demo_pretrain_epochs):
            perm = torch.randperm(n_demo, generator=g0)
            for s0 in range(0, n_demo, cfg.minibatch):
                idx = perm[s0 : s0 + cfg.minibatch]
                loss = regret_loss(actor(*(x[idx] for x in demos[:4])), demos[4][idx])
                opt_a.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                opt_a.step()
    rnorm = RunningNorm()
    val_cfg = replace(cfg.sim, split="val")
    best, hist = copy.deepcopy(actor.state_dict()), []
    best_val = validation_reward(data, actor, cfg, val_cfg) if use_demos else -np.inf  # the imitation alone
    if use_demos:
        hist.append({"update": 0, "env_steps": 0, "val_reward": best_val})
    writer = None
    if log_csv is not None:
        log_csv.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_csv, "w", newline="")
        writer = None
    it = range(cfg.updates)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"train {cfg.method} w={cfg.sim.qos.w:g}", unit="upd")
    t0 = time.time()
    for upd in it:
        beta = demo_share(upd, cfg.demo_start, cfg.demo_decay) if use_demos else 0.0
        stats = {"hit": 0.0, "false_hit": 0.0, "reward": 0.0}
        # ---- rollout ----
        for t in range(cfg.rollout_steps):
            batch = F.stack_observations(obs)
            q_exp = sim.expected_action_rewards()
            state = sim.global_state(obs, q_exp)
            inp = _to_t(batch)
            with torch.no_grad():
                logits = actor(*inp)
                dist = torch.distributions.Categorical(logits=logits)
                a = dist.sample()
                v = critic(torch.from_numpy(state)[None])[0]
            expert = np.argmax(q_exp, axis=1)
            take = (rng.random(N) < beta) if beta > 0 else np.zeros(N, dtype=bool)
            act = np.where(take, expert, a.numpy())
            logp = dist.log_prob(torch.from_numpy(act)).detach()
            if cfg.advantage == "immediate":
                immediate_buf[t] = torch.from_numpy(immediate_advantage(q_exp, torch.softmax(logits, -1).numpy(), act))
            rew, info, done, obs = sim.step(act)
            if cfg.advantage == "gae-expected":  # exact-tier answers keep their (action-independent) reward
                chosen = q_exp[np.arange(N), act]
                rew = np.where((info.exact > 0) | ~np.isfinite(chosen), rew, chosen)
            buf.request_embedding[t], buf.hit_embeddings[t], buf.hit_features[t], buf.hit_mask[t] = inp
            buf.state[t] = torch.from_numpy(state)
            buf.actions[t] = torch.from_numpy(act)
            buf.expert_actions[t] = torch.from_numpy(np.asarray(expert))
            regret_buf[t] = torch.from_numpy(_regret(q_exp, sim.qos.phi1))
            buf.from_expert[t] = torch.from_numpy(take.astype(np.float32))
            buf.logp[t], buf.values[t] = logp, v
            buf.rewards[t] = torch.from_numpy(rew.astype(np.float32))
            buf.dones[t] = float(done)
            exact_buf[t] = torch.from_numpy(info.exact.astype(np.float32))
            stats["hit"] += info.hit.sum()
            stats["false_hit"] += info.false_hit.sum()
            stats["reward"] += rew.mean()
        with torch.no_grad():
            last_v = critic(torch.from_numpy(sim.global_state(obs))[None])[0]
        # Values are predicted in normalised-reward units.
        rnorm.update(buf.rewards.numpy())
        r_n = (buf.rewards - rnorm.mean) / (rnorm.std + 1e-8)
        adv, ret = compute_gae(r_n, buf.values, buf.dones, last_v, cfg.gamma, cfg.gae_lambda)
        # ---- update ----
        T = cfg.rollout_steps
        flat = lambda x: x.reshape(T * N, *x.shape[2:])  # noqa: E731
        f_inp = [flat(buf.request_embedding), flat(buf.hit_embeddings), flat(buf.hit_features), flat(buf.hit_mask)]
        f_act, f_from, f_regret = flat(buf.actions), flat(buf.from_expert), flat(regret_buf)
        f_logp, f_adv = flat(buf.logp), flat(adv if cfg.advantage != "immediate" else immediate_buf)
        f_policy = 1.0 - flat(exact_buf)  # decisions the policy made (not the exact tier)
        f_adv = (f_adv - f_adv.mean()) / (f_adv.std() + 1e-8)
        states, rets = buf.state, ret  # critic trains on whole time steps [T, N, S] -> [T, N]
        g = torch.Generator().manual_seed(cfg.seed * 100003 + upd)
        losses = {"pi": 0.0, "v": 0.0, "ent": 0.0, "bc": 0.0}
        nb = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(T * N, generator=g)
            for s in range(0, T * N, cfg.minibatch):
                idx = perm[s : s + cfg.minibatch]
                logits = actor(*(x[idx] for x in f_inp))
                dist = torch.distributions.Categorical(logits=logits)
                new_logp = dist.log_prob(f_act[idx])
                pw = f_policy[idx]
                pl = ppo_policy_loss(new_logp, f_logp[idx], f_adv[idx], cfg.clip, weight=(1.0 - f_from[idx]) * pw)
                ent = (dist.entropy() * pw).sum() / pw.sum().clamp_min(1.0)
                if use_demos and beta > 0:
                    bc = regret_loss(logits, f_regret[idx], pw)
                    didx = torch.randint(0, demos[-1].shape[0], (cfg.minibatch,), generator=g)
                    bc = bc + regret_loss(actor(*(x[didx] for x in demos[:4])), demos[4][didx])
                else:
                    bc = torch.zeros(())
                loss = pl - cfg.ent_coef * ent + cfg.bc_coef * beta * bc
                opt_a.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
                opt_a.step()
                tidx = torch.randint(0, T, (max(1, cfg.minibatch // N),), generator=g)
                vl = value_loss(critic(states[tidx]), rets[tidx])
                opt_c.zero_grad()
                vl.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                opt_c.step()
                losses["pi"] += float(pl.detach())
                losses["v"] += float(vl.detach())
                losses["ent"] += float(ent.detach())
                losses["bc"] += float(bc.detach())
                nb += 1
        row = {"update": upd + 1, "env_steps": (upd + 1) * T * N, "wall_s": round(time.time() - t0, 1),
               "demo_share": beta, "rollout_reward": stats["reward"] / T,
               "rollout_hit_rate": stats["hit"] / (T * N),
               "rollout_false_hit_rate": stats["false_hit"] / max(stats["hit"], 1.0),
               **{f"loss_{k}": v / nb for k, v in losses.items()}, "val_reward": ""}
        if (upd + 1) % cfg.eval_every == 0 or upd + 1 == cfg.updates:
            vr = validation_reward(data, actor, cfg, val_cfg)
            row["val_reward"] = vr
            if vr > best_val:
                best_val, best = vr, copy.deepcopy(actor.state_dict())
        hist.append(row)
        if log_csv is not None:
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(row), restval="")
                writer.writeheader()
                if hist[0]["update"] == 0:  # validation of the imitation alone, before any PPO update
                    writer.writerow(hist[0])
            writer.writerow(row)
            fh.flush()
        if progress:
            it.set_postfix(r=f"{row['rollout_reward']:.2f}", hit=f"{row['rollout_hit_rate']:.2f}", demo=f"{beta:.2f}")
    if log_csv is not None:
        fh.close()
    actor.load_state_dict(best)
    actor.eval()
    return actor, hist


def validation_reward(data: Dataset, actor, cfg: TrainConfig, val_cfg: SimConfig) -> float:
    """Validation reward of the actor under its best serving rule: the argmax, or "A iff P(A) >= tau"
    with tau at a high quantile of P(A) on validation decisions (the rule the proxy serves with,
    ``baselines.decide``); mean over two stream seeds. Checkpoints are compared by this."""
    from .evaluate import collect_calibration

    actor.eval()
    seeds = tuple(range(4242, 4242 + cfg.eval_streams))
    rec = collect_calibration(data, NeuralPolicy(actor, cfg.method), val_cfg, cfg.eval_steps, seed=seeds[0])
    rewards = {None: [rec["metrics"]["reward"]]}  # that run was the argmax rule on the first seed
    for s in seeds[1:]:
        rewards[None].append(evaluate(data, NeuralPolicy(actor, cfg.method), val_cfg, cfg.eval_steps, seed=s)["reward"])
    p_a = rec["p_a"]
    for t in quantile_thresholds(p_a, (0.9, 0.95, 0.98, 0.99)):
        rewards[t] = [evaluate(data, NeuralPolicy(actor, cfg.method, tau=t), val_cfg, cfg.eval_steps, seed=s)["reward"]
                      for s in seeds]
    actor.train()
    return max(float(np.mean(r)) for r in rewards.values())


def _regret(q: np.ndarray, phi1: float) -> np.ndarray:
    """[N, 3] regret of each action against the best one, in satisfaction units (0 for unavailable
    actions: the actor gives them probability 0 anyway)."""
    best = np.max(q, axis=1, keepdims=True)
    r = np.where(np.isfinite(q), best - q, 0.0) / phi1
    return r.astype(np.float32)


def regret_loss(logits: torch.Tensor, regret: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Imitation loss of Algorithm 1, cost-sensitive: sum_a regret(a) * -log(1 - pi(a)), with
    regret(a) = max_b Q_E(b) - Q_E(a) from the expert's action values Q_E (in satisfaction units).
    It is ~0 when the actor puts its mass on the expert's action and, unlike cross-entropy to the
    expert's label, weighs each mistake by its cost: at w = 0.1 a wrong hit costs ~3x what a missed
    hit does, so the actor serves only when it is sure enough, and augments (C) when it is not.
    (The plain expected regret sum_a pi(a) regret(a) saturates: once pi(A) is small everywhere its
    gradient vanishes and the actor never learns to serve; the log form does not.)"""
    logp_not = torch.log1p(-torch.softmax(logits, dim=-1).clamp(max=1.0 - 1e-6))  # log(1 - pi(a))
    per = -(regret * logp_not).sum(-1)
    if weight is None:
        return per.mean()
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


def collect_demos(data: Dataset, sim_cfg: SimConfig, steps: int, eps: float) -> list[torch.Tensor]:
    """Expert demonstrations: run the expert (with ``eps`` random actions) on the training split and
    keep every decision the policy would make (a hit exists and the exact tier does not answer).
    Returns [request_embedding, hit_embeddings, hit_features, hit_mask, regret [n, 3], expert_action]."""
    sim = EdgeSim(data, sim_cfg)
    rng = np.random.default_rng(sim_cfg.seed)
    obs = sim.reset()
    keep: list[F.Observation] = []
    labels: list[int] = []
    values: list[np.ndarray] = []
    phi1 = sim.qos.phi1
    for _ in range(steps):
        q = sim.expected_action_rewards()
        expert = np.argmax(q, axis=1)
        for i in range(sim.N):
            if sim.sel[i] is not None and sim.exact[i] is None:
                keep.append(obs[i])
                labels.append(int(expert[i]))
                values.append(_regret(q[i : i + 1], phi1)[0])
        act = np.where(rng.random(sim.N) < eps, rng.integers(0, 3, sim.N), expert)
        _, _, _, obs = sim.step(act)
    batch = F.stack_observations(keep)
    return [*(torch.from_numpy(batch[k]) for k in F.INPUT_NAMES), torch.from_numpy(np.asarray(values, dtype=np.float32)),
            torch.tensor(labels, dtype=torch.long)]


def collect_neighbour_demos(data: Dataset, sim_cfg: SimConfig, decisions: int, *, mate_p: float = 0.3,
                            group_p: float = 0.3, other_entries: float = 600.0, seed: int = 0) -> list[torch.Tensor]:
    """Expert demonstrations on labelled semantic decisions, beyond what a stream happens to cache.

    For a request text of the training split or of the ``pairs`` split (labelled pairs that never enter
    a stream, ``DataSpec.qqp_pair_rows`` / ``sts_rows``), the "cache" is a random subset of those texts:
    each cluster mate (a true duplicate) with probability ``mate_p``, each text of the same group (a
    labelled near miss) with ``group_p``, any other text so that ``other_entries`` are expected (a
    600-entry cache). Its top-P hits make the observation (``features.build_observation``,
    as in the stream) and the expert labels it from the simulator's own action values
    (``EdgeSim.expected_action_rewards``): the cached answers are LLM answers to the cached questions,
    right exactly when the Eq. 4 entry is in the request's cluster. The entries are unused (use count 0,
    initial cache value, a random age): an entry's history is the stream's to teach — a used entry whose
    value stayed at 0 was served wrongly before, which random histories here would teach the actor to
    ignore. Requests follow the stream's source weights; STS-B sentences (translations, like XQuAD)
    take XQuAD's weight. With the verifier's scores attached (``data.pair_scores``), a cache holds no text
    above the cosine floor but the request's scored neighbours (``pair_scores.DEMO_NEIGHBOURS`` nearest):
    every verified hit then has its score without a verifier call. Same return format as ``collect_demos``.

    Why: the stream puts only a few hundred distinct true duplicates into a cache per epoch of
    training, and the hit scorer overfits them (docs/policy.md, "Status"); every labelled pair of the
    training data is a decision the expert can label."""
    sim = EdgeSim(data, replace(sim_cfg, split="train", seed=seed))
    sim.reset()
    rng = np.random.default_rng(seed)
    train_c = np.concatenate([data.clusters("train"), data.clusters("pairs")])
    qs = np.concatenate([data.c_members[c] for c in train_c])
    q_cl = data.q_cluster[qs]
    q_group = data.c_group[q_cl]
    q_src = data.c_source[q_cl]
    U = data.q_emb[qs]
    w_src = np.asarray([*sim_cfg.source_weights, sim_cfg.source_weights[SOURCES.index("xquad")]], dtype=float)
    p_req = np.zeros(len(qs))
    for si in np.unique(q_src):
        m = q_src == si
        p_req[m] = w_src[si] / m.sum()
    p_req /= p_req.sum()
    P, N = sim_cfg.top_p, sim.N
    other_p = min(1.0, other_entries / len(qs))
    scores = data.pair_scores
    keep: list[F.Observation] = []
    labels: list[int] = []
    values: list[np.ndarray] = []
    slot = 0
    while len(keep) < decisions:
        r = int(rng.choice(len(qs), p=p_req))
        pin = np.where(q_cl == q_cl[r], mate_p, np.where(q_group == q_group[r], group_p, other_p))
        pin[r] = 0.0
        cand = np.flatnonzero(rng.random(len(qs)) < pin)
        if len(cand) == 0:
            continue
        sims = U[cand] @ U[r]
        if scores is not None:  # above the floor, only the request's scored neighbours (policy.pair_scores)
            scored = scores.scored_neighbours(int(qs[r]))
            allowed = (sims < scores.rule.cosine_floor) | np.isin(qs[cand], list(scored))
            cand, sims = cand[allowed], sims[allowed]
            if len(cand) == 0:
                continue
        top = cand[np.argsort(-sims, kind="stable")[:P]]
        ages = rng.uniform(0.0, sim_cfg.episode_len * sim_cfg.step_s, size=len(top))
        sim.place_request(slot, int(qs[r]), qs[top], -ages)  # at sim time 0: created_at = -age
        slot += 1
        if slot == N:
            q = sim.expected_action_rewards()
            obs = sim.observations()
            for i in range(N):
                keep.append(obs[i])
                labels.append(int(np.argmax(q[i])))
                values.append(_regret(q[i : i + 1], sim.qos.phi1)[0])
            slot = 0
    batch = F.stack_observations(keep)
    return [*(torch.from_numpy(batch[k]) for k in F.INPUT_NAMES), torch.from_numpy(np.asarray(values, dtype=np.float32)),
            torch.tensor(labels, dtype=torch.long)]


def save_actor(actor, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": actor.state_dict(), "meta": meta}, path)


def load_actor(path: Path):
    ck = torch.load(path, weights_only=False)
    m = ck["meta"]
    actor = make_actor(m["arch"], m["dim"], m["k"], m["top_p"], **m.get("arch_options", {}))
    actor.load_state_dict(ck["state_dict"])
    actor.eval()
    return actor, m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.name == "sim":
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--w", type=float, default=0.1)
    ap.add_argument("--tiny", action="store_true", help="tiny dataset (tests)")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="datasets directory, laid out like ../shared/data [env VELO_DATASETS_DIR; default ../shared/data]")
    args = ap.parse_args(argv)
    from .data import DataSpec, DatasetsMissing, build_dataset, data_dir

    try:
        data_dir(args.data_dir)
    except DatasetsMissing as exc:
        raise SystemExit(f"policy.train: {exc}") from None
    if args.data_dir is not None:
        import os

        from .data import DATASETS_ENV

        os.environ[DATASETS_ENV] = str(args.data_dir)
    data = build_dataset(DataSpec.tiny() if args.tiny else DataSpec())
    kw = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "sim"}
    sim = SimConfig()
    cfg = TrainConfig(**kw, sim=replace(sim, qos=replace(sim.qos, w=args.w)))
    actor, _ = train(data, cfg, log_csv=args.out / f"{cfg.method}-w{args.w:g}.csv")
    save_actor(actor, args.out / f"{cfg.method}-w{args.w:g}.pt",
               actor_meta(cfg.method, dim=data.dim, top_p=cfg.sim.top_p, embedder_id=data.embedder_id,
                          config=asdict(cfg), verifier_sha256=verifier_sha256_of(data)))


if __name__ == "__main__":
    main()
