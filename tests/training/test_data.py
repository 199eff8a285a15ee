import gzip
import shutil

import numpy as np
import pytest

from training.mnist import load_mnist, read_idx
from training.splits import DataError, resolve_data_root


def test_paper_split_sizes_and_pixel_range(mnist_root):
    data = load_mnist(mnist_root)
    assert {k: len(v) for k, v in data.items()} == {"train": 55000, "val": 5000, "test": 10000}
    x = data["train"].images
    assert x.shape[1:] == (1, 28, 28)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(data["test"].labels.unique().tolist()) == set(range(10))


def test_split_is_fixed_by_seed_and_disjoint(mnist_root):
    a, b = load_mnist(mnist_root, split_seed=0), load_mnist(mnist_root, split_seed=0)
    assert (a["val"].images == b["val"].images).all()
    c = load_mnist(mnist_root, split_seed=1)
    assert not (a["val"].labels == c["val"].labels).all()
    # No validation image also appears in the training part.
    train_rows = {row.tobytes() for row in (a["train"].images[:, 0] * 255).byte().numpy()}
    val_rows = [row.tobytes() for row in (a["val"].images[:, 0] * 255).byte().numpy()[:200]]
    assert sum(row in train_rows for row in val_rows) < 5  # MNIST has a handful of exact duplicates


def test_gzipped_and_plain_files_read_the_same(mnist_root, tmp_path):
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((mnist_root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(plain), read_idx(mnist_root / "t10k-labels-idx1-ubyte.gz"))


def _copy_root(mnist_root, tmp_path):
    root = tmp_path / "mnist"
    shutil.copytree(mnist_root, root)
    for f in root.iterdir():
        f.chmod(0o644)
    return root


def test_corrupt_file_is_refused_by_name(mnist_root, tmp_path):
    root = _copy_root(mnist_root, tmp_path)
    target = root / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(target.read_bytes()))
    data[100] ^= 0xFF  # one flipped label byte: header and size still fine, checksum not
    target.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: md5"):
        load_mnist(root)


def test_truncated_gzip_is_refused_by_name(mnist_root, tmp_path):
    root = _copy_root(mnist_root, tmp_path)
    target = root / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:5000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read"):
        load_mnist(root)


def test_bad_header_is_refused_without_checksum(tmp_path):
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + (50).to_bytes(4, "big") + bytes(40))
    with pytest.raises(DataError, match="header says shape"):
        read_idx(bad, verify=False)
    bad.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad, verify=False)


def test_missing_file_and_root_are_named(mnist_root, tmp_path):
    root = _copy_root(mnist_root, tmp_path)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*missing mnist file"):
        load_mnist(root)
    with pytest.raises(DataError, match="no such directory"):
        resolve_data_root(str(tmp_path / "nowhere"))


def test_data_root_from_environment(monkeypatch, mnist_root):
    monkeypatch.setenv("PROTOSERVE_DATA_ROOT", str(mnist_root))
    assert resolve_data_root(None) == mnist_root
    monkeypatch.delenv("PROTOSERVE_DATA_ROOT")
    with pytest.raises(DataError, match="no data root"):
        resolve_data_root(None)


def test_fashion_mnist_is_a_config_with_its_own_checksums(tmp_path):
    from training.config import load_config

    assert load_config("configs/prototypedl_fashion_mnist.yaml").data.dataset == "fashion_mnist"
    # MNIST's files are not Fashion-MNIST's: the published Fashion-MNIST sums refuse them.
    fake = tmp_path / "t10k-labels-idx1-ubyte.gz"
    fake.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes(3)))
    with pytest.raises(DataError, match="md5 .* does not match"):
        read_idx(fake, dataset="fashion_mnist")
