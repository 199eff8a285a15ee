"""A real `bentoml serve` process on a free port, serving the tiny bundle (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(bundle: Path, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PROTOSERVE_BUNDLE": str(bundle), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                "PYTHONPATH": str(REPO), **extra})
    env.pop("PROTOSERVE_MODEL_TAG", None)
    return env


@contextmanager
def bentoml_serve(env: dict[str, str], log: Path, timeout: float = 180.0):
    """Start `bentoml serve service.service:Protoserve`, wait for /readyz, yield its URL, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service.service:Protoserve",
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bentoml serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def start_service():
    """start_service(bundle, home, log, timeout=180, **env) -> a context manager yielding the URL."""
    def start(bundle: Path, home: Path, log: Path, timeout: float = 180.0, **extra: str):
        return bentoml_serve(serve_env(bundle, home, **extra), log, timeout)
    return start


SERVER_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def server(tiny_bundle, tmp_path_factory) -> str:
    """The URL of a running service (two API workers) on the tiny bundle."""
    home = tmp_path_factory.mktemp("bentoml_home")
    with bentoml_serve(serve_env(tiny_bundle, home, PROTOSERVE_WORKERS="2"), home / "serve.log") as url:
        SERVER_LOGS[url] = home / "serve.log"
        yield url


@pytest.fixture(scope="session")
def server_log(server) -> Path:
    """The combined log of the `server` process and its workers."""
    return SERVER_LOGS[server]
