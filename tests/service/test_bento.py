"""`bentoml build` from bentofile.yaml, in a temporary BENTOML_HOME: the Bento holds every module its
code imports, and its requirements install every package that code imports."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
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
    assert (src / "service" / "api.py").is_file() and (src / "bundle" / "manifest.py").is_file()
    assert not (src / "training").exists() and not (src / "export" / "build.py").exists()
    assert (src / "service" / "review_page.html").is_file()
    ours = {path.name for path in REPO.iterdir() if (path / "__init__.py").is_file()}
    imports = code_imports(src, ours)
    missing_modules = sorted(m for m in imports if m.split(".")[0] in ours and not module_in(src, m))
    assert not missing_modules, f"imported by the Bento's code, not in the Bento: {missing_modules}"
    installed = requirement_closure(requirements)
    distributions = metadata.packages_distributions()
    missing_packages = sorted(top for top in {m.split(".")[0] for m in imports} - ours
                              if not any(normal(d) in installed for d in distributions.get(top, [top])))
    assert not missing_packages, f"imported by the Bento's code, not installed by its requirements: {missing_packages}"


def code_imports(src: Path, ours: set[str]) -> set[str]:
    """Absolute imports of the Bento's Python files (lazy ones included: a code path needs them), except
    the standard library's and those guarded by `except ImportError` (optional by design)."""
    found = set()
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guards = [g for g in ast.walk(tree) if isinstance(g, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in g.handlers)]
        optional = {id(node) for guard in guards for node in ast.walk(guard)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return {m for m in found if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}


def module_in(src: Path, module: str) -> bool:
    path = src.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def normal(name: str) -> str:
    return re.split(r"[\s\[<>=!~;]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirement_closure(requirements: str) -> set[str]:
    """The distributions the requirements install: each listed one and what it requires, as installed here."""
    todo = [normal(line) for line in requirements.splitlines() if line.strip() and not line.startswith("#")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [normal(r) for r in metadata.requires(name) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            continue
    return seen


def test_service_code_never_imports_torch(tiny_bundle):
    code = ("import sys\n"
            "import service.api\n"
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
