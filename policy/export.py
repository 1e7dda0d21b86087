"""Export the actor alone to ONNX (named inputs, dynamic batch, metadata) and check parity with torch.

Inputs: request_embedding [B, D], hit_embeddings [B, P, D], hit_features [B, P, K], hit_mask [B, P]
(float32, mask 1 = real hit); output: action_probs [B, 3] in the order A, B, C.

metadata_props: velo_feature_version, velo_embedder_id, velo_verifier_sha256, velo_dim, velo_top_p, velo_k,
velo_hit_features (JSON list of names), velo_policy_version, velo_calibration (JSON, see docs/policy.md).

    python -m policy.export runs/lrs-w0.1.pt --calibration runs/calibration.json --out velo_proxy/policies/lrs-default.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from velo_proxy import features as F

from .networks import ActorProbs

OUTPUT_NAME = "action_probs"


def example_inputs(dim: int, top_p: int, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but valid observations (unit vectors, varied masks including an empty one)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((batch, dim)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = u[:, None, :] + 0.3 * rng.standard_normal((batch, top_p, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    mask = (rng.random((batch, top_p)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    mask[0] = 0.0  # one request without hits
    sim = np.einsum("bd,bpd->bp", u, v)
    feats = np.zeros((batch, top_p, F.K), dtype=np.float32)
    for b in range(batch):
        for p in range(top_p):
            feats[b, p] = F.hit_feature_row(sim[b, p], kind=0, cache_value=float(rng.random()), use_count=int(rng.integers(5)),
                                            age_s=float(rng.random() * 1000), rank=p, top_p=top_p, top_similarity=sim[b, 0])
    feats *= mask[..., None]
    v *= mask[..., None]
    return {"request_embedding": u, "hit_embeddings": v.astype(np.float32), "hit_features": feats, "hit_mask": mask}


def export_onnx(actor: torch.nn.Module, path: Path, *, dim: int, top_p: int, embedder_id: str,
                policy_version: str, calibration: dict, extra: dict | None = None,
                verifier_sha256: str | None = None) -> dict[str, str]:
    """Write the ONNX actor with metadata; returns the metadata dict. ``verifier_sha256``: the weights of
    the pair verifier whose scores the actor was trained on (its hit features); the proxy refuses the
    policy beside another verifier."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ActorProbs(actor).eval()
    ex = example_inputs(dim, top_p)
    args = tuple(torch.from_numpy(ex[k]) for k in F.INPUT_NAMES)
    dyn = {k: {0: "batch"} for k in F.INPUT_NAMES}
    dyn[OUTPUT_NAME] = {0: "batch"}
    torch.onnx.export(model, args, str(path), input_names=list(F.INPUT_NAMES), output_names=[OUTPUT_NAME],
                      dynamic_axes=dyn, opset_version=17, dynamo=False, do_constant_folding=True)
    import onnx

    m = onnx.load(str(path))
    meta = {
        "velo_feature_version": str(F.FEATURE_VERSION),
        "velo_embedder_id": embedder_id,
        "velo_dim": str(dim),
        "velo_top_p": str(top_p),
        "velo_k": str(F.K),
        "velo_hit_features": json.dumps(list(F.HIT_FEATURE_NAMES)),
        "velo_actions": json.dumps(list(F.ACTIONS)),
        "velo_policy_version": policy_version,
        "velo_calibration": json.dumps(calibration, sort_keys=True),
    }
    if verifier_sha256:
        meta["velo_verifier_sha256"] = verifier_sha256
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return meta


def parity(actor: torch.nn.Module, path: Path, *, dim: int, top_p: int, batch: int = 16, seed: int = 1) -> float:
    """Max abs difference of action_probs between torch and onnxruntime on random observations."""
    import onnxruntime as ort

    ex = example_inputs(dim, top_p, batch=batch, seed=seed)
    with torch.no_grad():
        ref = ActorProbs(actor).eval()(*(torch.from_numpy(ex[k]) for k in F.INPUT_NAMES)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], ex)[0]
    return float(np.max(np.abs(out - ref)))


def main(argv=None) -> None:
    from .train import load_actor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--calibration", type=Path, required=True, help="JSON written by policy.reproduce")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy-version", default="lrs-custom")
    a = ap.parse_args(argv)
    actor, m = load_actor(a.checkpoint)
    cal = json.loads(a.calibration.read_text())
    export_onnx(actor, a.out, dim=m["dim"], top_p=m["top_p"], embedder_id=m["embedder_id"],
                policy_version=a.policy_version, calibration=cal, verifier_sha256=m.get("verifier_sha256"))
    print(f"wrote {a.out}; parity max abs diff {parity(actor, a.out, dim=m['dim'], top_p=m['top_p']):.2e}")


if __name__ == "__main__":
    main()
