"""The review API's part of /docs.json against a registry-mode service: schemathesis finds nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_live_switch import registry_service

# On SQLite only (slow; the API document: the same routes on either engine)
pytestmark = [pytest.mark.slow, pytest.mark.registry_engines("sqlite")]
CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "document-key"


def test_schemathesis_finds_no_contract_violation_in_the_review_api(two_versions, tmp_path):
    registry, *_ = two_versions
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is not installed: pip install '.[dev]'"
    with registry_service(registry, tmp_path / "serve.log", PROTOSERVE_ADMIN_KEY=KEY) as url:
        paths = httpx.get(f"{url}/docs.json").json()["paths"]
        assert paths["/review/api/verdicts"]["post"]["security"] == [{"adminKey": []}]
        result = subprocess.run(
            [st, "--config-file", str(CONFIG), "run", f"{url}/docs.json", "--checks", "all",
             "--include-path-regex", "^/review/api", "-H", f"Authorization: Bearer {KEY}", "--max-examples", "10",
             "--seed", "10", "--workers", "1", "--suppress-health-check", "all", "--request-timeout", "60"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
