"""Actor and critic networks.

Actor (shared by all agents, decentralised: it sees only its own observation):
- one token for the request, u·sqrt(D);
- one token per hit i: [v_i, |u - v_i|, u ⊙ v_i] (scaled by sqrt(D), sqrt(D), D so entries are O(1)),
  the K hit features and a learned rank embedding — the siamese-classifier view (u, v, |u-v|, u·v);
- ``TransformerActor``: a pre-LN Transformer encoder over these 1 + P tokens with padding masked
  (our reading of Eq. 7), the request token's output -> 3 logits;
- ``MLPActor`` (plain MAPPO / G-MAPPO): the same token inputs, flattened, through an MLP.
- ``DiffusionActor`` (DLRS): the Transformer encoder's request token conditions a denoiser that recovers
  the logits from Gaussian noise in a few DDIM steps.
A and C are impossible without a hit: their logits are pushed to -1e4 when the mask is all zero.
The attention is written out by hand (no fused kernels) so the ONNX export is plain and matches torch.

Critic (training only): per-agent state rows [N, S] -> shared row encoder -> concatenation of all
agents' codes (the global state) -> one value per agent.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HitTokens(nn.Module):
    """Builds the request token and the P hit tokens, projected to ``d_model``."""

    def __init__(self, dim: int, k: int, top_p: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.vec_scale = 1.0  # 0 = ablation without the vectors (hit features only)
        self.req = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, d_model), nn.LayerNorm(d_model))
        self.hit = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * dim + k, d_model), nn.LayerNorm(d_model))
        self.rank = nn.Parameter(torch.zeros(top_p, d_model))
        self.kind = nn.Parameter(torch.zeros(2, d_model))  # 0 request token, 1 hit token

    def raw_hit_inputs(self, u, v, feats):
        s = math.sqrt(self.dim) * self.vec_scale
        uu = u.unsqueeze(1).expand_as(v)
        return torch.cat([v * s, (uu - v).abs() * s, uu * v * self.dim * self.vec_scale, feats], dim=-1)

    def forward(self, u, v, feats):
        r = self.req(u * math.sqrt(self.dim) * self.vec_scale) + self.kind[0]
        h = self.hit(self.raw_hit_inputs(u, v, feats)) + self.rank + self.kind[1]
        return torch.cat([r.unsqueeze(1), h], dim=1)  # [B, 1+P, d]


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.h = n_heads
        self.scale = 1.0 / math.sqrt(d_model // n_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x, key_bias):  # x [B, T, d], key_bias [B, 1, 1, T] (0 or -1e4)
        b, t, d = x.shape
        dh = d // self.h
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, T, dh]
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scale + key_bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(y)
        return x + self.ff(self.ln2(x))


def _mask_unavailable(logits, hit_mask):
    has_hit = hit_mask.max(dim=-1).values  # [B]
    pen = (1.0 - has_hit) * -1e4
    zero = torch.zeros_like(pen)
    return logits + torch.stack([pen, zero, pen], dim=-1)


class TransformerActor(nn.Module):
    def __init__(self, dim: int, k: int, top_p: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = HitTokens(dim, k, top_p, d_model, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 3))

    def forward(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        x = self.tokens(request_embedding, hit_embeddings, hit_features)
        valid = torch.cat([torch.ones_like(hit_mask[:, :1]), hit_mask], dim=1)  # request token always valid
        key_bias = ((1.0 - valid) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        return _mask_unavailable(self.head(x[:, 0]), hit_mask)


def cosine_alpha_bar(steps: int) -> torch.Tensor:
    """alpha_bar_t for t = 0..steps of the cosine schedule (Nichol & Dhariwal), alpha_bar_0 = 1."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (f / f[0]).clamp(min=1e-5).float()


class DiffusionActor(nn.Module):
    """DLRS's actor (docs/policy.md, "DLRS"): LRS's Transformer encoder conditions a denoiser that
    recovers the three action logits from Gaussian noise in ``steps`` DDIM steps (eta = 0).

    x_T = noise_scale * eps; at each step t the denoiser predicts the clean logits x0 from
    (x_t, t, condition), and x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps_hat. The last x0
    are the logits (A and C masked without hits, as LRS's). While training, eps is drawn afresh on every
    forward (the policy is stochastic through its noise, and PPO's ratio and the imitation loss are
    taken through the whole chain); in eval mode eps = 0, the mean path, so serving (and the ONNX graph,
    the loop unrolled by tracing) is deterministic."""

    def __init__(self, dim: int, k: int, top_p: int, *, steps: int = 10, noise_scale: float = 1.0,
                 d_model: int = 64, n_layers: int = 2, n_heads: int = 4, d_ff: int = 128, t_dim: int = 16) -> None:
        super().__init__()
        self.steps = int(steps)
        self.noise_scale = float(noise_scale)
        self.tokens = HitTokens(dim, k, top_p, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.cond = nn.LayerNorm(d_model)
        self.t_dim = t_dim
        self.denoiser = nn.Sequential(nn.Linear(3 + t_dim + d_model, d_model), nn.GELU(),
                                      nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 3))
        abar = cosine_alpha_bar(self.steps)
        self.register_buffer("sqrt_abar", abar.sqrt(), persistent=False)
        self.register_buffer("sqrt_1m_abar", (1 - abar).sqrt(), persistent=False)
        half = t_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = torch.arange(self.steps + 1, dtype=torch.float32)[:, None] * freqs[None]
        self.register_buffer("t_embed", torch.cat([angles.sin(), angles.cos()], dim=-1), persistent=False)

    def condition(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        x = self.tokens(request_embedding, hit_embeddings, hit_features)
        valid = torch.cat([torch.ones_like(hit_mask[:, :1]), hit_mask], dim=1)
        key_bias = ((1.0 - valid) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        return self.cond(x[:, 0])

    def forward(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        c = self.condition(request_embedding, hit_embeddings, hit_features, hit_mask)
        b = c.shape[0]
        x = torch.zeros(b, 3, dtype=c.dtype, device=c.device)
        if self.training and self.noise_scale > 0:
            x = x + self.noise_scale * torch.randn_like(x)
        x0 = x
        for t in range(self.steps, 0, -1):  # a Python loop: traced into a fixed chain of steps
            temb = self.t_embed[t].expand(b, self.t_dim)
            x0 = self.denoiser(torch.cat([x, temb, c], dim=-1))
            eps = (x - self.sqrt_abar[t] * x0) / self.sqrt_1m_abar[t]
            x = self.sqrt_abar[t - 1] * x0 + self.sqrt_1m_abar[t - 1] * eps
        return _mask_unavailable(x0, hit_mask)


class MLPActor(nn.Module):
    def __init__(self, dim: int, k: int, top_p: int, hidden: int = 128) -> None:
        super().__init__()
        self.tokens = HitTokens(dim, k, top_p, 1)  # only raw_hit_inputs is used
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + top_p * (3 * dim + k + 1), hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        raw = self.tokens.raw_hit_inputs(request_embedding, hit_embeddings, hit_features) * hit_mask.unsqueeze(-1)
        x = torch.cat([request_embedding * math.sqrt(self.dim), raw.flatten(1), hit_mask], dim=-1)
        return _mask_unavailable(self.net(x), hit_mask)


class ActorProbs(nn.Module):
    """What gets exported: the four named inputs -> ``action_probs`` [B, 3] (A, B, C)."""

    def __init__(self, actor: nn.Module) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        return torch.softmax(self.actor(request_embedding, hit_embeddings, hit_features, hit_mask), dim=-1)


class Critic(nn.Module):
    def __init__(self, state_dim: int, n_agents: int, hidden: int = 128) -> None:
        super().__init__()
        self.n = n_agents
        self.row = nn.Sequential(nn.Linear(state_dim, hidden), nn.Tanh())
        self.net = nn.Sequential(nn.Linear(n_agents * hidden + n_agents * 0, hidden), nn.Tanh(), nn.Linear(hidden, n_agents))

    def forward(self, state):  # [B, N, S] -> [B, N]
        return self.net(self.row(state).flatten(1))


def make_actor(arch: str, dim: int, k: int, top_p: int, **options) -> nn.Module:
    """``options``: the architecture's own (``DiffusionActor``: steps, noise_scale), saved with a checkpoint."""
    if arch == "transformer":
        return TransformerActor(dim, k, top_p, **options)
    if arch == "mlp":
        return MLPActor(dim, k, top_p, **options)
    if arch == "diffusion":
        return DiffusionActor(dim, k, top_p, **options)
    raise ValueError(arch)
