"""The policy directory: where the retrain job (``policy.retrain``) publishes policy versions and
the proxies hot-reload them from (``velo_proxy.policy_manager``). Its layout is defined here only:

    <root>/CURRENT                  JSON pointer: version, file, checkpoint (optional), published_at, ...
    <root>/versions/<version>.onnx  the exported actor the proxies serve
    <root>/versions/<version>.pt    its training checkpoint, where the next retrain starts from
    <root>/VERIFIER                 the pair verifier's recalibration on judged traffic (JSON: version,
                                    verifier_id, head, thresholds, cosine_floor, top_k, evaluation, ...);
                                    read by the verified policy (``policy.retrain_verifier`` writes it)
    <root>/versions/<version>.verifier.json   the same record, kept per version

Every file is written atomically (temp file + rename) and ``CURRENT`` last, so a reader sees the old
version or the new one, never half a file or a pointer to a file not yet there.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CURRENT = "CURRENT"
VERIFIER = "VERIFIER"
VERSIONS = "versions"


class PolicyDirectory:
    """A directory of published policy versions (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS

    def current(self) -> dict[str, Any] | None:
        """The ``CURRENT`` pointer with ``path`` (the ONNX file) added; None when nothing is published."""
        try:
            pointer = json.loads((self.root / CURRENT).read_text())
        except (FileNotFoundError, ValueError):
            return None
        pointer["path"] = str(self.versions / pointer["file"])
        return pointer

    def checkpoint(self) -> tuple[Path, str] | None:
        """(training checkpoint, version) of the current version, when it was published with one that
        is still there."""
        pointer = self.current()
        if pointer is None or not pointer.get("checkpoint"):
            return None
        path = self.versions / pointer["checkpoint"]
        return (path, pointer["version"]) if path.exists() else None

    def publish(self, onnx_bytes: bytes, *, version: str, info: dict[str, Any] | None = None,
                checkpoint: bytes | None = None) -> Path:
        """Write ``versions/<version>.onnx`` (and ``.pt`` when a ``checkpoint`` is given), then point
        ``CURRENT`` at them. Returns the ONNX file."""
        self.versions.mkdir(parents=True, exist_ok=True)
        target = self.versions / f"{version}.onnx"
        atomic_write(target, onnx_bytes)
        pointer: dict[str, Any] = {"version": version, "file": target.name, **(info or {})}
        if checkpoint is not None:
            saved = self.versions / f"{version}.pt"
            atomic_write(saved, checkpoint)
            pointer["checkpoint"] = saved.name
        atomic_write(self.root / CURRENT, json.dumps(pointer, indent=2).encode())
        return target


    def verifier_recalibration(self) -> dict[str, Any] | None:
        """The published recalibration of the pair verifier; None when there is none (or unreadable)."""
        try:
            record = json.loads((self.root / VERIFIER).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("version") else None

    def publish_verifier_recalibration(self, record: dict[str, Any]) -> Path:
        """Keep ``versions/<version>.verifier.json``, then replace ``VERIFIER`` (atomically, last)."""
        self.versions.mkdir(parents=True, exist_ok=True)
        data = json.dumps(record, indent=2).encode()
        atomic_write(self.versions / f"{record['version']}.verifier.json", data)
        atomic_write(self.root / VERIFIER, data)
        return self.root / VERIFIER


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
