"""`protoserve import` and `protoserve models` against a temporary BentoML home."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bundle.manifest import read_bundle
from bundle.store import StoreError, bundle_dir, import_bundle, list_models, load_stored_bundle
from cli.main import main


@pytest.fixture
def bentoml_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def test_import_then_list(tiny_bundle, bentoml_home, capsys):
    assert main(["models"]) == 0
    assert "no protoserve models" in capsys.readouterr().out

    assert main(["import", str(tiny_bundle)]) == 0
    assert "imported tiny-prototypedl:0.1.0" in capsys.readouterr().out
    stored = bentoml_home / "models" / "tiny-prototypedl" / "0.1.0"
    assert (stored / "model.yaml").is_file()

    assert main(["models"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 1 and listing[0].startswith("tiny-prototypedl:0.1.0") and "prototypedl" in listing[0]

    manifest = read_bundle(tiny_bundle).manifest
    again = load_stored_bundle("tiny-prototypedl:0.1.0").manifest
    assert again == manifest  # the store holds the bundle unchanged, and it passes every check


def test_labels_and_metadata_come_from_the_manifest(tiny_bundle, bentoml_home):
    import bentoml

    from bundle.store import _model_store

    import_bundle(tiny_bundle)
    model = bentoml.models.get("tiny-prototypedl:0.1.0", _model_store=_model_store())
    m = read_bundle(tiny_bundle).manifest
    assert model.info.labels["family"] == "prototypedl"
    assert model.info.labels["source_commit"] == m.training.source_commit
    assert model.info.metadata["test_accuracy"] == m.metrics.test_accuracy
    assert model.info.metadata["parity"]["images"] == 1000
    assert model.info.metadata["n_prototypes"] == 15


def test_same_version_twice_is_refused_unless_forced(tiny_bundle, bentoml_home, capsys):
    import_bundle(tiny_bundle)
    assert main(["import", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny-prototypedl:0.1.0: already in the BentoML model store" in err[0]
    assert main(["import", "--force", str(tiny_bundle)]) == 0
    assert [r.tag for r in list_models()] == ["tiny-prototypedl:0.1.0"]


def test_a_damaged_bundle_is_not_imported(tiny_bundle, bentoml_home, tmp_path, capsys):
    damaged = Path(shutil.copytree(tiny_bundle, tmp_path / "damaged"))
    (damaged / "probe.npz").write_bytes(b"")
    assert main(["import", str(damaged)]) == 2
    assert f"{damaged / 'probe.npz'}: sha256 does not match" in capsys.readouterr().err
    assert list_models() == []
    with pytest.raises(StoreError, match="not in the BentoML model store"):
        bundle_dir("tiny-prototypedl:0.1.0")


def test_store_follows_bentoml_home(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "a"))
    import_bundle(tiny_bundle)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "b"))
    assert list_models() == []
