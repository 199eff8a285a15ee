"""Verdicts through the running service are durable: none lost to concurrency or to SIGKILL."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_live_switch import registry_service

pytestmark = pytest.mark.slow

KEY = "durable-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def post_verdicts(url: str, client: int, count: int) -> list[tuple[int, str]]:
    """(verdict id, worker pid) of each acknowledged verdict; a new connection per request so that both
    workers take them (a kept-alive connection stays with one worker)."""
    acknowledged = []
    with httpx.Client(timeout=60, headers={**AUTH, "Connection": "close"}) as http:
        for i in range(count):
            r = http.post(f"{url}/review/api/verdicts",
                          json={"prototype_id": i % 10, "verdict": "reject", "source": f"client-{client}",
                                "note": str(i)})
            assert r.status_code == 201, r.text
            acknowledged.append((r.json()["id"], r.headers["x-protoserve-worker"]))
    return acknowledged


def test_four_clients_two_workers_lose_no_verdict(two_versions, tmp_path):
    registry, v1, _ = two_versions
    with registry_service(registry, tmp_path / "serve.log", PROTOSERVE_ADMIN_KEY=KEY) as url:
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            answers = [a for ids in pool.map(lambda c: post_verdicts(url, c, 200), range(4)) for a in ids]
        print(f"800 verdicts from 4 clients in {time.perf_counter() - started:.1f} s")
        for headers in ({}, {"Authorization": "Bearer wrong"}):  # refused by the real server, nothing stored
            r = httpx.post(f"{url}/review/api/verdicts", headers=headers,
                           json={"prototype_id": 1, "verdict": "reject", "source": "mallory"})
            assert r.status_code == 401 and KEY not in r.text
        stored = httpx.get(f"{url}/review/api/verdicts", params={"version": v1}).json()["verdicts"]
        paths = httpx.get(f"{url}/docs.json").json()["paths"]
    assert {"/review/api/verdicts", "/review/api/promote", "/review/api/jobs/{job_id}"} <= set(paths)
    assert "401" in paths["/review/api/verdicts"]["post"]["responses"]
    acknowledged = [i for i, _ in answers]
    assert len({worker for _, worker in answers}) == 2  # both workers wrote
    assert len(acknowledged) == len(set(acknowledged)) == 800
    assert {v["id"] for v in stored} == set(acknowledged)
    for c in range(4):  # each client's verdicts in the order it sent them
        notes = [int(v["note"]) for v in stored if v["source"] == f"client-{c}"]
        assert notes == list(range(200))


def test_every_acknowledged_verdict_survives_sigkill(two_versions, tmp_path):
    registry, v1, _ = two_versions
    acknowledged, stop = [], threading.Event()

    def stream(url: str) -> None:
        with httpx.Client(timeout=10) as http:
            i = 0
            while not stop.is_set():
                try:
                    r = http.post(f"{url}/review/api/verdicts", headers=AUTH,
                                  json={"prototype_id": i % 10, "verdict": "accept", "source": "stream"})
                except httpx.HTTPError:
                    return  # the server died under us: this one was never acknowledged
                if r.status_code == 201:
                    acknowledged.append(r.json()["id"])
                i += 1

    with registry_service(registry, tmp_path / "serve.log", PROTOSERVE_ADMIN_KEY=KEY) as url:
        writers = [threading.Thread(target=stream, args=(url,)) for _ in range(2)]
        for w in writers:
            w.start()
        time.sleep(2.0)
        worker = int(httpx.get(f"{url}/readyz").headers["x-protoserve-worker"])
        os.killpg(os.getpgid(worker), signal.SIGKILL)  # the server and both workers, mid-stream
        stop.set()
        for w in writers:
            w.join(30)
    assert len(acknowledged) > 20
    with registry_service(registry, tmp_path / "serve2.log", PROTOSERVE_ADMIN_KEY=KEY) as url:
        stored = {v["id"] for v in httpx.get(f"{url}/review/api/verdicts", params={"version": v1}).json()["verdicts"]}
    assert set(acknowledged) <= stored
    print(f"{len(acknowledged)} acknowledged before SIGKILL, {len(stored)} stored")
