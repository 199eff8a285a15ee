"""Bundles in the BentoML model store: `protoserve import` and `protoserve models`. No torch.

A store entry is tagged `name:version` from the manifest; the verified bundle is copied unchanged
into its `bundle/` folder (BentoML writes its own model.yaml beside it), so the service reads it
back with read_bundle(bundle_dir(tag)). The store is $BENTOML_HOME/models (default ~/bentoml),
resolved on every call so a test or a user can point BENTOML_HOME elsewhere at any time.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bundle.manifest import Bundle, Manifest, read_bundle
from bundle.runtime import verify_bundle
from protoserve.bentoml_internals import model_store
from protoserve.errors import ProtoserveError

BUNDLE_DIR = "bundle"
# BentoML reports usage to its makers unless told not to; protoserve never phones home.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


class StoreError(ProtoserveError):
    pass


@dataclass
class StoredModel:
    tag: str
    family: str
    test_accuracy: float | None
    created_at: str
    path: Path


def bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()


def _model_store():
    # The public bentoml.models functions bind the store of the first BENTOML_HOME they see;
    # an explicit store follows the variable as it is now.
    directory = bentoml_home() / "models"
    directory.mkdir(parents=True, exist_ok=True)
    return model_store(directory)


def labels(m: Manifest) -> dict[str, str]:
    return {"family": m.family, "name": m.name, "version": m.version, "schema_version": str(m.schema_version),
            "source_commit": m.training.source_commit or "unknown"}


def metadata(m: Manifest) -> dict:
    parity = m.metrics.parity.model_dump() if m.metrics.parity else None
    return {"created_at": m.created_at.isoformat(), "class_names": list(m.class_names),
            "n_prototypes": len(m.prototypes), "outputs": [t.name for t in m.model.outputs],
            "test_accuracy": m.metrics.test_accuracy, "onnx_test_accuracy": m.metrics.onnx_test_accuracy,
            "parity": parity, "manifest_sha256": m.manifest_sha256,
            "checkpoint_sha256": m.training.checkpoint_sha256}


def import_bundle(path: str | Path, force: bool = False) -> StoredModel:
    """Verify the bundle (checksums and golden probe), then copy it into the store as name:version."""
    import bentoml
    from bentoml.exceptions import NotFound

    bundle, _ = verify_bundle(path)
    m = bundle.manifest
    store = _model_store()
    try:
        bentoml.models.get(m.tag, _model_store=store)
        exists = True
    except NotFound:
        exists = False
    if exists and not force:
        raise StoreError(f"{m.tag}: already in the BentoML model store ({bentoml_home() / 'models'}); "
                         "bump the version, or pass --force to replace it")
    if exists:
        bentoml.models.delete(m.tag, _model_store=store)
    with bentoml.models.create(m.tag, labels=labels(m), metadata=metadata(m), _model_store=store) as model:
        shutil.copytree(bundle.path, model.path_of(BUNDLE_DIR))
    return _row(bentoml.models.get(m.tag, _model_store=store))


def list_models() -> list[StoredModel]:
    """Every protoserve bundle in the store, newest first (other BentoML models are left out)."""
    import bentoml

    models = [m for m in bentoml.models.list(_model_store=_model_store()) if Path(m.path_of(BUNDLE_DIR)).is_dir()]
    return sorted((_row(m) for m in models), key=lambda r: r.created_at, reverse=True)


def bundle_dir(tag: str) -> Path:
    """The folder of a stored bundle (`name:version`, or `name` / `name:latest` for the newest)."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag, _model_store=_model_store())
    except NotFound:
        raise StoreError(f"{tag}: not in the BentoML model store at {bentoml_home() / 'models'}") from None
    return Path(model.path_of(BUNDLE_DIR))


def load_stored_bundle(tag: str) -> Bundle:
    """read_bundle of a stored bundle: the same checks as for a bundle on disk."""
    return read_bundle(bundle_dir(tag))


def _row(model) -> StoredModel:
    meta = model.info.metadata
    return StoredModel(tag=str(model.tag), family=model.info.labels.get("family", "?"),
                       test_accuracy=meta.get("test_accuracy"), created_at=str(meta.get("created_at", "")),
                       path=Path(model.path_of(BUNDLE_DIR)))
