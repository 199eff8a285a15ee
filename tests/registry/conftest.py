"""Registry fixtures: a registry holding the tiny bundle as two versions (same weights, two names), on
each database engine.

Every test that takes `registry_engine` (directly, or through `two_versions` / `protopnet_registry`)
runs twice: on the default SQLite file and on a fresh database of a real PostgreSQL server (one per
session, started by `postgres_server`). The engine reaches every Registry made in the test, and every
process it starts (CLI, `bentoml serve`, workers), through PROTOSERVE_REGISTRY_DB, as in a deployment.
A test or module marked `registry_engines("sqlite")` runs on the engines it names only.
"""

from __future__ import annotations

import itertools

import pytest

from bundle.manifest import copy_as_version
from protoserve.settings import variable
from registry.local_postgres import LocalPostgres
from registry.postgres_engine import PostgresEngine

ENGINES = ("sqlite", "postgresql")
_databases = itertools.count()


def pytest_generate_tests(metafunc):
    if "registry_engine" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("registry_engines")
        metafunc.parametrize("registry_engine", marker.args if marker else ENGINES, indirect=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server (initdb in a temporary folder, a free port), stopped after the session."""
    with LocalPostgres(durable=False) as server:
        yield server


@pytest.fixture
def registry_engine(request, monkeypatch):
    """"sqlite" (PROTOSERVE_REGISTRY_DB unset: the registry directory's file) or "postgresql" (a new database)."""
    if request.param == "sqlite":
        monkeypatch.delenv(variable("registry_db"), raising=False)
        yield request.param
        return
    server = request.getfixturevalue("postgres_server")
    name = f"registry_{next(_databases)}"
    url = server.create_database(name)
    monkeypatch.setenv(variable("registry_db"), url)
    yield request.param
    PostgresEngine(url).close()  # this process's pool; the drop closes what other processes left open
    server.drop_database(name)


@pytest.fixture
def two_versions(registry_engine, tiny_bundle, tiny_checkpoint, tmp_path):
    """(registry, "0.1.0", "0.2.0"): both registered, 0.1.0 active."""
    from registry.versions import Registry

    registry = Registry(tmp_path / "registry")
    registry.register(tiny_bundle, tiny_checkpoint)
    registry.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    registry.promote("0.1.0", actor="test")
    return registry, "0.1.0", "0.2.0"


@pytest.fixture
def protopnet_registry(registry_engine, tiny_protopnet_bundle, tiny_protopnet_checkpoint, tmp_path):
    """A registry whose active version is the tiny ProtoPNet (0.1.0), registered with its checkpoint."""
    from registry.versions import Registry

    registry = Registry(tmp_path / "registry")
    registry.register(tiny_protopnet_bundle, tiny_protopnet_checkpoint)
    registry.promote("0.1.0")
    return registry
