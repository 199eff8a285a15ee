"""monitoring/: promtool checks the rules and their unit tests; a real Prometheus scrapes a real service."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.demo import free_port

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        pytest.fail("promtool not installed: run `make prometheus` (Debian package prometheus)")
    return subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)


def test_promtool_checks_rules_and_config():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_intended():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_metrics_pass_promtool_check_metrics(server):
    httpx.post(f"{server}/predict", json={"images": [[[0.5] * 28] * 28]}, timeout=60)  # every family of series
    exposition = httpx.get(f"{server}/metrics", timeout=30).text
    assert "protoserve_reference_nearest_distance{" in exposition and 'level="0.95"' in exposition
    if PROMTOOL is None:
        pytest.fail("promtool not installed: run `make prometheus` (Debian package prometheus)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def query(url: str, promql: str) -> dict:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, f"{promql}: {r.text}"
    return r.json()["data"]


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(server, tmp_path):
    """A Prometheus server scraping the running service every second, with protoserve's rules."""
    if PROMETHEUS is None:
        pytest.fail("prometheus not installed: run `make prometheus` (Debian package prometheus)")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while scalar_or_none(url, 'up{job="protoserve"}') != 1.0:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (tmp_path / "prometheus.log").read_text()[-2000:]
                pytest.fail(f"prometheus did not scrape the service:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()


def scalar_or_none(url: str, promql: str) -> float | None:
    try:
        return scalar(url, promql)
    except (httpx.HTTPError, AssertionError):
        return None


@pytest.mark.slow
def test_prometheus_sees_the_predictions_sent(server, prometheus, tiny_bundle):
    import numpy as np

    with np.load(tiny_bundle / "probe.npz") as probe:
        images = probe["input.image"]
    promql = 'sum(protoserve_predictions_total{model="tiny-prototypedl"})'
    time.sleep(1.5)  # one scrape after whatever other tests sent
    start = scalar(prometheus, promql) or 0.0
    sent = 0
    with httpx.Client(base_url=server, timeout=60) as client:
        for i in range(10):
            r = client.post("/predict", json={"images": [images[i].tolist()] * (i + 1)})
            assert r.status_code == 200
            sent += i + 1
    deadline = time.monotonic() + 30
    while (seen := scalar(prometheus, promql)) != start + sent:
        assert time.monotonic() < deadline, f"Prometheus shows {seen}, expected {start + sent}"
        time.sleep(0.5)
    by_class = query(prometheus, 'sum by (class) (protoserve_predictions_total{model="tiny-prototypedl"})')
    assert sum(float(r["value"][1]) for r in by_class["result"]) == start + sent
    info = query(prometheus, "protoserve_model_info")["result"]
    assert [r["metric"]["provider"] for r in info] == ["CPUExecutionProvider"]
    assert scalar(prometheus, 'max(protoserve_reference_nearest_distance{level="0.95"})') > 0


@pytest.mark.slow
def test_every_dashboard_and_rule_query_is_valid_promql(prometheus):
    dashboard = json.loads((MONITORING / "grafana" / "protoserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [rule["expr"] for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
              for rule in group["rules"]]
    for expr in exprs:
        r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "success", f"{expr}: {r.text}"
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {rule["name"] for g in rules for rule in g["rules"]} >= {"ProtoserveNearestPrototypeDistanceDrift",
                                                                     "ProtoserveHighErrorRate",
                                                                     "ProtoserveOutOfDomainRate",
                                                                     "ProtoserveVersionRefused"}
