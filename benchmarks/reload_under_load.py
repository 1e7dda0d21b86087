"""Hot reload under load: clients keep sending requests while new policy versions are published; count
requests, failures, and the versions each response reports (x-velo-policy).

    python benchmarks/reload_under_load.py [--clients 8] [--seconds 30] [--versions 3]

The proxy and a fake upstream run as subprocesses on loopback; versions are the shipped LRS policy
re-published under new names (``PolicyDirectory.publish``, as `velo-proxy retrain` does).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from velo_proxy.devtools.server import free_port
from velo_proxy.policy import PolicyDirectory, default_policy_path

QUESTIONS = ["What is the capital of France?", "How do vaccines work?", "What is the capital city of France?",
             "Explain how vaccines work.", "Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"]


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--versions", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="velo-reload-"))
    directory = PolicyDirectory(work / "policies")
    shipped = default_policy_path().read_bytes()
    directory.publish(shipped, version="bench-v0")
    up_port, proxy_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "velo_proxy.devtools.fake_upstream", "--port", str(up_port),
                                 "--latency-ms", "50"])
    env = {**os.environ, "VELO_UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/v1", "VELO_PORT": str(proxy_port),
           "VELO_DATA_DIR": str(work / "data"), "VELO_POLICY_DIR": str(directory.root), "VELO_POLICY_RELOAD_S": "0.5",
           "VELO_LOG_LEVEL": "warning"}
    proxy = subprocess.Popen([sys.executable, "-m", "velo_proxy", "serve"], env=env)
    url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_ready(url)
        counts: collections.Counter[str] = collections.Counter()
        failures: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(seed: int) -> None:
            with httpx.Client(timeout=30) as http:
                i = seed
                while not stop.is_set():
                    body = {"model": "fake-model", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                    i += 1
                    try:
                        response = http.post(f"{url}/v1/chat/completions", json=body)
                        ok = response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
                        with lock:
                            if ok:
                                counts[response.headers["x-velo-policy"]] += 1
                            else:
                                failures.append(f"{response.status_code}: {response.text[:200]}")
                    except Exception as exc:  # noqa: BLE001 - every failure counts
                        with lock:
                            failures.append(repr(exc))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        interval = args.seconds / (args.versions + 1)
        published = []
        for v in range(1, args.versions + 1):
            time.sleep(interval)
            directory.publish(shipped, version=f"bench-v{v}")
            published.append((round(time.monotonic(), 1), f"bench-v{v}"))
        time.sleep(interval)
        stop.set()
        for thread in threads:
            thread.join()
        total = sum(counts.values()) + len(failures)
        print(json.dumps({"clients": args.clients, "seconds": args.seconds, "requests": total,
                          "failed": len(failures), "responses_by_policy_version": dict(sorted(counts.items())),
                          "published": [v for _, v in published], "first_failures": failures[:5]}, indent=2))
    finally:
        proxy.terminate()
        upstream.terminate()
        proxy.wait(timeout=30)
        upstream.wait(timeout=30)


if __name__ == "__main__":
    main()
