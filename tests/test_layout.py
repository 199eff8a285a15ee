"""The layout's own rules that import-linter cannot see: no import of the project hidden inside a
function (the way a cycle is dodged). Two places defer on purpose, for start-up cost: the CLI loads
the torch side only for the verbs that need it, and the service mounts the review app (FastAPI and
its models) only where it is served. Third-party imports (pyarrow, bentoml, ray) are not checked."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bundle", "inference", "service", "scoring", "registry", "protoserve", "training", "revision",
            "export", "worker", "cli")
ALLOWED = {"cli/main.py", "cli/review.py", "service/api.py"}


def function_level_project_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else \
                [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
            found += [f"{path.relative_to(root)}:{inner.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    return found


def test_no_project_import_is_hidden_inside_a_function():
    hidden = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
              if str(path.relative_to(ROOT)) not in ALLOWED for hit in function_level_project_imports(path)]
    assert hidden == []


def test_the_check_sees_a_function_level_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("import json\n\ndef f():\n    import yaml\n    from training.config import Config\n")
    assert function_level_project_imports(module, tmp_path) == ["probe.py:5 training.config"]


def test_no_script_is_named_like_a_package():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like a package
    (inference.py, revision.py) shadows it for every import the script makes, however indirect."""
    for folder in ("benchmarks", "cli", "tests"):
        clashes = sorted(p.stem for p in (ROOT / folder).rglob("*.py") if p.stem in PACKAGES)
        assert not clashes, f"{folder}/: {clashes} shadow the packages of the same name"
