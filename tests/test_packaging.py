"""A wheel of the project (what `pip install .` installs) holds every file its packages need, not only
the Python modules: the editable install of `make setup` reads the checkout and would hide a gap, and so
would a checkout's own build/ and *.egg-info, hence the build from a copy of the tracked files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_every_file_of_the_packages(tmp_path):
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in patterns]
    tracked = subprocess.run(["git", "ls-files", *packages], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked, "git ls-files found nothing: not a checkout?"
    source = tmp_path / "source"
    for name in [*tracked, "pyproject.toml", "README.md"]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    held = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("protoserve-*.whl"))).namelist())
    missing = sorted(f for f in tracked if f not in held)
    assert not missing, f"in the checkout's packages, not in the wheel: {missing}"
