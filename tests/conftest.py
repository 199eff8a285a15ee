"""Fixtures shared by every part's tests: the MNIST data root and a tiny PrototypeDL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from s3_server import seaweedfs
from tiny_configs import TINY_QUALITY_OPTIONS, tiny_config_dict, tiny_protopnet_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
CHECKOUT_MNIST = REPO / "data" / "mnist"  # where `make data` downloads MNIST when ../shared has none
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def default_mnist_root() -> Path:
    """$PROTOSERVE_DATA_ROOT, else ../shared/data/mnist when it exists, else data/mnist (as the Makefile)."""
    if os.environ.get("PROTOSERVE_DATA_ROOT"):
        return Path(os.environ["PROTOSERVE_DATA_ROOT"])
    return SHARED_MNIST if SHARED_MNIST.is_dir() else CHECKOUT_MNIST


def missing_mnist_files(root: Path) -> list[str]:
    """The IDX files not under root (plain or gzipped, at the top or where torchvision puts them)."""
    folders = (root, root / "MNIST" / "raw")
    return [name for name in MNIST_FILES
            if not any((folder / f).is_file() for folder in folders for f in (name, f"{name}.gz"))]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The official MNIST IDX files. Missing, the whole run stops with one line saying how to get them:
    most of the suite needs them, and a suite that skips them would pass without testing anything."""
    root = default_mnist_root()
    missing = missing_mnist_files(root)
    if missing:
        pytest.exit(f"MNIST is missing under {root} ({', '.join(missing)}): run `make data` (downloads it once "
                    "with torchvision's downloader, md5 checked) or set PROTOSERVE_DATA_ROOT to a folder holding "
                    "the four IDX files", returncode=pytest.ExitCode.USAGE_ERROR)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, mnist_root) -> Path:
    """A PrototypeDL trained for two short epochs on 1,000 MNIST images (seconds)."""
    from training.config import Config
    from training.train_prototypedl import PrototypeDLTrainer

    out = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config_dict(epochs=2)
    config["data"]["train_subset"] = 1000
    trainer = PrototypeDLTrainer(Config.from_dict(config), out, data_root=mnist_root, log=lambda s: None)
    trainer.fit()
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint, mnist_root) -> Path:
    """The bundle of tiny_checkpoint, written by `protoserve export` (parity on 1,000 test images)."""
    return _export_tiny(tmp_path_factory, tiny_checkpoint, "tiny-prototypedl", mnist_root)


@pytest.fixture(scope="session")
def tiny_protopnet_checkpoint(tmp_path_factory, mnist_root) -> Path:
    """A ProtoPNet trained for two short epochs on 500 MNIST images, pushed after the second (seconds)."""
    from training.config import Config
    from training.train_protopnet import ProtoPNetTrainer

    out = tmp_path_factory.mktemp("tiny_protopnet_run")
    config = tiny_protopnet_dict()
    config["data"]["train_subset"] = 500
    config["train"]["epochs"] = 2
    ProtoPNetTrainer(Config.from_dict(config), out, data_root=mnist_root, log=lambda s: None).fit()
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_protopnet_bundle(tmp_path_factory, tiny_protopnet_checkpoint, mnist_root) -> Path:
    """The bundle of tiny_protopnet_checkpoint (parity on 1,000 test images)."""
    return _export_tiny(tmp_path_factory, tiny_protopnet_checkpoint, "tiny-protopnet", mnist_root)


def _export_tiny(tmp_path_factory, checkpoint: Path, name: str, mnist_root: Path) -> Path:
    """`protoserve export` of a tiny checkpoint as <name>:0.1.0, parity on the first 1,000 test images,
    with a quality report on a small sample (TINY_QUALITY)."""
    from export.build import export_bundle
    from export.quality.report import QualityOptions

    out = tmp_path_factory.mktemp(name.replace("-", "_")) / "bundle"
    export_bundle(checkpoint, out, name, "0.1.0", data_root=str(mnist_root), test_images=1000, log=lambda s: None,
                  quality=QualityOptions(**TINY_QUALITY_OPTIONS))
    return out


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS's `weed mini`, registry/local_s3.py) for the session."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A new bucket, and this process's environment pointed at the server (the standard AWS variables)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    name = f"versions-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name
