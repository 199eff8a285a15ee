"""`protoserve demo` and `protoserve serve` from the command line; the explanation figure."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from inference.explain import png_base64
from inference.figure import MARGIN, SCALE, explanation_figure

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("PROTOSERVE_BUNDLE", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_figure_has_input_reconstruction_and_each_prototype():
    tile = png_base64(Image.new("L", (28, 28), 255))
    answer = {"model": {"name": "m", "version": "1"},
              "prediction": {"label": 1, "class_name": "one", "probabilities": [0.1, 0.9]},
              "reconstruction": tile,
              "prototypes": [{"id": i, "class_identity": 1, "class_name": "one", "distance": 0.5 * i, "image": tile}
                             for i in range(3)]}
    figure = explanation_figure(answer, Image.new("L", (28, 28)))
    side = 28 * SCALE
    assert figure.size[0] == MARGIN + 5 * (side + MARGIN)
    # Tile 0 is the (black) input, tiles 1-4 the (white) reconstruction and prototypes.
    assert figure.getpixel((MARGIN + side // 2, MARGIN + side // 2)) == (0, 0, 0)
    for i in range(1, 5):
        assert figure.getpixel((MARGIN + i * (side + MARGIN) + side // 2, MARGIN + side // 2)) == (255, 255, 255)
    del answer["reconstruction"]
    assert explanation_figure(answer, Image.new("L", (28, 28))).size[0] == MARGIN + 4 * (side + MARGIN)
    assert base64.b64decode(tile)[:4] == b"\x89PNG"


def test_protopnet_figure_adds_where_each_prototype_was_found_and_its_source():
    white, grey = png_base64(Image.new("L", (28, 28), 255)), png_base64(Image.new("L", (28, 28), 128))
    patch = png_base64(Image.new("L", (14, 7), 0))  # a receptive-field patch: not square
    answer = {"model": {"name": "m", "version": "1"},
              "prediction": {"label": 0, "class_name": "zero", "probabilities": [0.9, 0.1]},
              "prototypes": [{"id": i, "class_identity": 0, "class_name": "zero", "distance": 0.01, "similarity": 4.6,
                              "contribution": 4.6, "image": patch, "heatmap": white, "source_image": grey}
                             for i in range(2)]}
    figure = explanation_figure(answer, Image.new("L", (28, 28)))
    side = 28 * SCALE
    assert figure.size[0] == MARGIN + 3 * (side + MARGIN)
    column = MARGIN + (side + MARGIN) + side // 2
    row = [MARGIN + j * (side + 52) + side // 2 for j in range(3)]
    assert figure.getpixel((column, row[1])) == (255, 255, 255)  # the heatmap tile
    assert figure.getpixel((column, row[2])) == (128, 128, 128)  # the source image tile
    # The 14x7 patch keeps its aspect: scaled 8x to 112x56, centred, white above and below it.
    assert figure.getpixel((column, row[0])) == (0, 0, 0)
    assert figure.getpixel((column, MARGIN + 2)) == (255, 255, 255)


def test_serve_refuses_a_missing_bundle_in_one_line(tmp_path):
    result = cli("serve", "--bundle", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"protoserve serve: error: {tmp_path / 'nothing'}: not a bundle directory (no such directory)"]


@pytest.mark.slow
def test_demo_serves_predicts_explains_and_writes_the_picture(tiny_bundle, tmp_path):
    out = tmp_path / "explanation.png"
    result = cli("demo", "--bundle", str(tiny_bundle), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "POST /predict" in result.stdout and "POST /explain" in result.stdout
    digits = re.findall(r"digit #(\d+): true (\S+), predicted (\S+) \(p = ", result.stdout)
    assert [(int(i), true) for i, true, _ in digits] == [(i, str(i)) for i in range(10)], result.stdout
    correct = sum(true == predicted for _, true, predicted in digits)
    assert f": {correct} correct" in result.stdout
    assert result.stdout.count('"distance"') == 3
    figure = Image.open(out)
    assert figure.format == "PNG" and figure.size[0] == MARGIN + 5 * (28 * SCALE + MARGIN)
    assert "Starting production HTTP BentoServer" in out.with_suffix(".serve.log").read_text()
    # The service was stopped: nothing listens on its port any more.
    url = re.search(r"ready at (http://\S+)", result.stdout).group(1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/livez", timeout=5)


@pytest.mark.slow
def test_a_port_taken_before_the_server_binds_it_is_retried_on_another(tiny_bundle, tmp_path, monkeypatch):
    """CI once lost a whole stage when another process took the chosen port during the server's start."""
    import socket

    from service import demo

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports, real = iter([busy]), demo.free_port
        monkeypatch.setattr(demo, "free_port", lambda: next(ports, None) or real())
        with demo.running_service(tiny_bundle, None, tmp_path / "serve.log", 180) as url:
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            assert not url.endswith(f":{busy}")

