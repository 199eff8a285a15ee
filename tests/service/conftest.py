"""A real `bentoml serve` process on a free port, serving the tiny bundle (tests/conftest.py)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from service.demo import DemoError, running_service


def serve_env(home: Path, **extra: str) -> dict[str, str]:
    return {"BENTOML_HOME": str(home), **extra}


@contextmanager
def bentoml_serve(bundle: Path, env: dict[str, str], log: Path, timeout: float = 180.0):
    """Start `bentoml serve service.api:Protoserve`, wait for /readyz, yield its URL, stop it."""
    try:
        with running_service(bundle, None, log, timeout, env=env) as url:
            yield url
    except DemoError as e:
        pytest.fail(f"bentoml serve: {e}\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def start_service():
    """start_service(bundle, home, log, timeout=180, **env) -> a context manager yielding the URL."""
    def start(bundle: Path, home: Path, log: Path, timeout: float = 180.0, **extra: str):
        return bentoml_serve(bundle, serve_env(home, **extra), log, timeout)
    return start


SERVER_LOGS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def server(tiny_bundle, tmp_path_factory) -> str:
    """The URL of a running service (two API workers) on the tiny bundle."""
    home = tmp_path_factory.mktemp("bentoml_home")
    with bentoml_serve(tiny_bundle, serve_env(home, PROTOSERVE_WORKERS="2"), home / "serve.log") as url:
        SERVER_LOGS[url] = home / "serve.log"
        yield url


@pytest.fixture(scope="session")
def server_log(server) -> Path:
    """The combined log of the `server` process and its workers."""
    return SERVER_LOGS[server]
