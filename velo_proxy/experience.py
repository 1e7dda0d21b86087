"""The experience stream: every decision of an edge agent, and every reward that arrives later, as
entries of a bounded Redis stream ``velo:experience:<agent_id>``. The retrain job reads the streams
of all agents (centralised training) and joins rewards to decisions by ``request_id``.

Stream entry fields (all strings):

    kind=decision  request_id, agent, ts, action (A|B|C), prob (probability of the logged action),
                   probs (JSON [pA, pB, pC]), explored (0|1), policy (version), delay_s,
                   entry (entry id used by A/C, or ""), obs (base64 float32: u[D] | V[P*D] | F[P*K] | mask[P]),
                   obs_now (the time the observation was built at), dim, top_p, k
    kind=reward    request_id, agent, ts, source (shadow|feedback), q (satisfaction), score (outcome in [0, 1])

Without Redis the proxy serves as usual and reports experience as off (``/readyz``, ``/admin/stats``).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from velo_proxy import features as F

STREAM_PREFIX = "velo:experience:"


def stream_key(agent_id: str) -> str:
    return f"{STREAM_PREFIX}{agent_id}"


def encode_observation(obs: F.Observation) -> str:
    flat = np.concatenate([obs.request_embedding.ravel(), obs.hit_embeddings.ravel(), obs.hit_features.ravel(),
                           obs.hit_mask.ravel()]).astype(np.float32)
    return base64.b64encode(flat.tobytes()).decode()


def decode_observation(data: str, *, dim: int, top_p: int, k: int) -> F.Observation:
    flat = np.frombuffer(base64.b64decode(data), dtype=np.float32)
    sizes = [dim, top_p * dim, top_p * k, top_p]
    if flat.size != sum(sizes):
        raise ValueError(f"observation has {flat.size} values, expected {sum(sizes)}")
    u, v, f, m = np.split(flat, np.cumsum(sizes)[:-1])
    return F.Observation(u, v.reshape(top_p, dim), f.reshape(top_p, k), m)


@dataclass
class ExperienceLog:
    """Appends to this agent's stream. Methods raise on Redis errors; the engine fails open."""

    redis: Any  # redis.asyncio.Redis (decode_responses=True)
    agent_id: str
    max_len: int

    @property
    def key(self) -> str:
        return stream_key(self.agent_id)

    async def decision(self, *, request_id: str, action: str, probability: float, probs: tuple[float, ...] | None,
                       explored: bool, policy: str, delay_s: float, entry: str | None,
                       observation: F.Observation, observed_at: float, embedder: str) -> None:
        """``embedder``: the id of the embedder whose vectors the observation holds (retraining learns only
        from its own embedder's: two embedders' vectors of one size are not one space)."""
        top_p, dim = observation.hit_embeddings.shape
        fields = {
            "kind": "decision", "request_id": request_id, "agent": self.agent_id, "ts": f"{time.time():.3f}",
            "action": action, "prob": f"{probability:.6f}", "probs": json.dumps(list(probs or ())),
            "explored": "1" if explored else "0", "policy": policy, "delay_s": f"{delay_s:.6f}", "entry": entry or "",
            "obs": encode_observation(observation), "obs_now": repr(observed_at), "dim": str(dim), "top_p": str(top_p),
            "k": str(observation.hit_features.shape[1]), "embedder": embedder,
        }
        await self.redis.xadd(self.key, fields, maxlen=self.max_len, approximate=True)

    async def reward(self, *, request_id: str, source: str, q: float, score: float) -> None:
        fields = {"kind": "reward", "request_id": request_id, "agent": self.agent_id, "ts": f"{time.time():.3f}",
                  "source": source, "q": f"{q:.6f}", "score": f"{score:.6f}"}
        await self.redis.xadd(self.key, fields, maxlen=self.max_len, approximate=True)


async def read_all_streams(redis: Any, *, count: int = 1000) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Every agent's stream, oldest first: {agent stream key: [(entry id, fields), ...]}."""
    streams: dict[str, list[tuple[str, dict[str, str]]]] = {}
    async for key in redis.scan_iter(match=f"{STREAM_PREFIX}*", count=100):
        entries: list[tuple[str, dict[str, str]]] = []
        last = "-"
        while True:
            batch = await redis.xrange(key, min=last, max="+", count=count)
            if last != "-" and batch and batch[0][0] == last:
                batch = batch[1:]
            if not batch:
                break
            entries.extend(batch)
            last = batch[-1][0]
        streams[key] = entries
    return streams
