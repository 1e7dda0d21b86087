"""Small rule-based actors exported through the real export path (policy.export), so the proxy's
policy loading, metadata checks, calibration and hot reload are tested against genuine ONNX files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from policy.export import export_onnx
from policy.networks import _mask_unavailable
from velo_proxy import features as F


class RuleActor(nn.Module):
    """logits: A = steep(top hit's feature - serve_above), B = 0, C = c_logit; no hits -> B. The feature
    is the similarity, or another hit feature (``on``), e.g. the verifier's score. ``steer="C"`` swaps the
    roles of A and C: C = steep(...), A = c_logit."""

    def __init__(self, *, serve_above: float, c_logit: float, on: str = "similarity", steer: str = "A") -> None:
        super().__init__()
        self.serve_above = serve_above
        self.c_logit = c_logit
        self.column = F.HIT_FEATURE_NAMES.index(on)
        self.steer_c = steer == "C"

    def forward(self, request_embedding, hit_embeddings, hit_features, hit_mask):
        top = hit_features[:, 0, self.column]
        steep = 60.0 * (top - self.serve_above)
        fixed = torch.full_like(top, self.c_logit)
        a, c = (fixed, steep) if self.steer_c else (steep, fixed)
        logits = torch.stack([a, torch.zeros_like(top), c], dim=-1)
        return _mask_unavailable(logits, hit_mask)


def export_rule_policy(path: Path, *, embedder_id: str, version: str, serve_above: float = 0.9,
                       c_logit: float = -20.0, dim: int = 384, top_p: int = 5,
                       thresholds: dict[str, float] | None = None, on: str = "similarity",
                       verifier_sha256: str | None = None, steer: str = "A") -> Path:
    calibration = {"format": 1, "default_delta": 0.02,
                   "thresholds": thresholds or {"0.01": 0.9, "0.02": 0.5, "0.05": 0.3}}
    export_onnx(RuleActor(serve_above=serve_above, c_logit=c_logit, on=on, steer=steer), Path(path), dim=dim, top_p=top_p,
                embedder_id=embedder_id, policy_version=version, calibration=calibration,
                verifier_sha256=verifier_sha256)
    return Path(path)
