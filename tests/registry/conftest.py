"""Registry fixtures: a registry holding the tiny bundle as two versions (same weights, two names)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bundle.manifest import read_bundle, write_manifest


def retag(bundle: Path, version: str, out: Path) -> Path:
    """A copy of `bundle` whose manifest names `version` (checksums rewritten, so it verifies)."""
    target = Path(shutil.copytree(bundle, out))
    manifest = read_bundle(target).manifest
    write_manifest(target, manifest.model_copy(update={"version": version}))
    return target


@pytest.fixture
def two_versions(tiny_bundle, tiny_checkpoint, tmp_path):
    """(registry, "0.1.0", "0.2.0"): both registered, 0.1.0 active."""
    from registry.versions import Registry

    registry = Registry(tmp_path / "registry")
    registry.register(tiny_bundle, tiny_checkpoint)
    registry.register(retag(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    registry.promote("0.1.0", actor="test")
    return registry, "0.1.0", "0.2.0"


@pytest.fixture
def protopnet_registry(tiny_protopnet_bundle, tiny_protopnet_checkpoint, tmp_path):
    """A registry whose active version is the tiny ProtoPNet (0.1.0), registered with its checkpoint."""
    from registry.versions import Registry

    registry = Registry(tmp_path / "registry")
    registry.register(tiny_protopnet_bundle, tiny_protopnet_checkpoint)
    registry.promote("0.1.0")
    return registry
