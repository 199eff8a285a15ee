"""`protoserve explain IMAGE...`: the /explain answer and picture for local files, no server; one readable
line for each bad file, the rest still explained."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.ood_sets import photo_like  # noqa: E402

BUNDLE = REPO / "models" / "prototypedl_mnist" / "bundle"


@pytest.fixture(scope="module")
def test_digits(mnist_root) -> tuple[np.ndarray, np.ndarray]:
    """The first 10 MNIST test images (uint8 [10, 28, 28]) and their labels."""
    def read(name: str, offset: int) -> np.ndarray:
        gz = mnist_root / f"{name}.gz"
        data = gzip.decompress(gz.read_bytes()) if gz.exists() else (mnist_root / name).read_bytes()
        return np.frombuffer(data, np.uint8, offset=offset)
    return read("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)[:10], read("t10k-labels-idx1-ubyte", 8)[:10]


def test_a_photo_like_jpeg_with_canonicalize_names_its_digit_and_writes_the_picture(test_digits, tmp_path, capsys):
    images, labels = test_digits
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_like(images[:1, None] / 255.0, seed=0, size=300)[0])  # dark ink on light paper
    picture = tmp_path / "explained.png"
    assert main(["explain", str(photo), "--bundle", str(BUNDLE), "--canonicalize", "--out", str(picture),
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["prediction"]["label"] == int(labels[0])
    assert answer["prediction"]["in_domain"] is True
    assert len(answer["prototypes"]) == 3 and answer["reconstruction"]
    assert answer["picture"] == str(picture)
    drawn = Image.open(picture)
    assert drawn.mode == "RGB" and drawn.width > 4 * 112  # input, reconstruction and three prototypes


def test_bad_files_get_one_line_each_and_the_rest_are_explained(test_digits, tmp_path, capsys):
    images, labels = test_digits
    good = tmp_path / "seven.png"
    buffer = io.BytesIO()
    Image.fromarray(images[0], mode="L").save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(buffer.getvalue()[:60])
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    missing = tmp_path / "missing.png"
    code = main(["explain", str(missing), str(corrupt), str(good), str(text), "--bundle", str(BUNDLE),
                 "--top-k", "2", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith(f"protoserve explain: {missing}: not_an_image: cannot read the file")
    assert lines[1].startswith(f"protoserve explain: {corrupt}: corrupt_image")
    assert lines[2].startswith(f"protoserve explain: {text}: not_an_image: not a PNG or JPEG image")
    assert f"{good}: predicted {labels[0]}" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seven.png"]


@pytest.mark.parametrize("images, args, message", [
    (1, ["--top-k", "99"], '"top_k" is 99; it must be between 1 and'),
    (2, ["--out", "one.png"], "is one file; give a folder for 2 images"),
])
def test_bad_options_are_one_line(images, args, message, test_digits, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    picture = tmp_path / "a.png"
    Image.fromarray(test_digits[0][0], mode="L").save(picture)
    assert main(["explain", *[str(picture)] * images, "--bundle", str(BUNDLE), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("protoserve explain: error: ")
