"""`bentoml build` from bentofile.yaml, in a temporary BENTOML_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bentoml_build(tiny_bundle, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "PROTOSERVE_BUNDLE": str(tiny_bundle),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    assert name == "protoserve"
    bento = tmp_path / "home" / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    services = {s["name"]: s for s in info["services"]}
    assert set(services) == {"protoserve"}
    assert services["protoserve"]["config"]["resources"] == {"gpu": 1}
    assert services["protoserve"]["config"]["workers"] == 2
    routes = {r["route"] for r in info["schema"]["routes"]}
    assert {"/predict", "/explain", "/metadata", "/prototypes"} <= routes
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu[cuda,cudnn]" in requirements and "bentoml==1.4.39" in requirements
    assert "torch" not in requirements
    assert (bento / "env" / "docker" / "Dockerfile").is_file()
    src = bento / "src"
    assert (src / "service" / "service.py").is_file() and (src / "export" / "bundle.py").is_file()
    assert not (src / "training").exists() and not (src / "export" / "build.py").exists()


def test_service_code_never_imports_torch(tiny_bundle):
    code = ("import sys\n"
            "import service.service\n"
            "from inference.model import load_model\n"
            f"model = load_model({str(tiny_bundle)!r}, device='cpu')\n"
            "assert model.provider == 'CPUExecutionProvider'\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    env = {**os.environ, "PROTOSERVE_BUNDLE": str(tiny_bundle), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
