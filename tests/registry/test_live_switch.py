"""Every worker follows the active version without a restart, failing and dropping nothing."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.demo import running_service

pytestmark = pytest.mark.slow


@contextmanager
def registry_service(registry, log: Path, **env: str):
    """`bentoml serve` with two workers following `registry`."""
    env = {"PROTOSERVE_REGISTRY": str(registry.root), "PROTOSERVE_WORKERS": "2",
           "BENTOML_HOME": str(log.parent / "bentoml_home"), **env}
    with running_service(registry.active_bundle(), None, log, 180, env=env) as url:
        yield url


class Load:
    """Clients posting /predict in a loop; every answer recorded as (time, worker, version)."""

    def __init__(self, url: str, images: list, clients: int = 4):
        self.url, self.images, self.answers, self.errors = url, images, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        # A new connection per request: a kept-alive one stays with the worker that accepted it.
        with httpx.Client(timeout=30, headers={"Connection": "close"}) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(f"{self.url}/predict", json={"images": self.images})
                    body = r.json()
                    if r.status_code != 200 or body["model"]["version"] != r.headers["x-model-version"]:
                        self.errors.append((r.status_code, r.text[:200]))
                        continue
                    self.answers.append((time.monotonic(), r.headers["x-protoserve-worker"],
                                         body["model"]["version"]))
                except Exception as e:  # a dropped connection is a failure of the switch
                    self.errors.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def digits_of(bundle: Path) -> list:
    with np.load(bundle / "probe.npz") as probe:
        return probe["input.image"][:2, 0].tolist()


def wait_all_workers_on(load: Load, version: str, since: float, timeout: float = 2.0) -> float:
    """Seconds until every worker answered with `version` and nothing older came after."""
    deadline = since + timeout + 1.0  # the test's own polling adds up to a second
    while time.monotonic() < deadline:
        later = [a for a in load.answers if a[0] > since]
        workers = {w for _, w, _ in later}
        on_new = {w: t for t, w, v in later if v == version}
        if len(workers) == 2 and set(on_new) == workers:
            last_old = max((t for t, _, v in later if v != version), default=since)
            return last_old - since
        time.sleep(0.05)
    raise AssertionError(f"not every worker answered with {version} within {timeout} s")


def test_workers_follow_five_switches_under_load(two_versions, tmp_path):
    registry, v1, v2 = two_versions
    with registry_service(registry, tmp_path / "serve.log") as url, \
            Load(url, digits_of(registry.active_bundle())) as load:
        ready = httpx.get(f"{url}/readyz")
        assert ready.json()["model"]["version"] == ready.headers["x-model-version"] == v1
        assert httpx.get(f"{url}/metadata").json()["worker"]["generation"] == registry.store.active().generation
        time.sleep(1.0)
        lags = []
        for i in range(5):
            target = v2 if i % 2 == 0 else v1
            switched = time.monotonic()
            registry.promote(target) if i < 4 else registry.rollback()
            if i == 4:
                target = registry.store.active().version
            lags.append(wait_all_workers_on(load, target, switched))
            time.sleep(0.5)
            settled = time.monotonic() - 0.4
            assert {v for t, _, v in load.answers if t > settled} == {target}
        served = {line.split('version="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                  for line in httpx.get(f"{url}/metrics").text.splitlines()
                  if line.startswith("protoserve_model_info{")}
        assert served[target] == 1 and served.get(v2 if target == v1 else v1, 0) == 0, served
    assert not load.errors, load.errors[:5]
    assert len({w for _, w, _ in load.answers}) == 2
    assert {v for _, _, v in load.answers} == {v1, v2}
    assert max(lags) < 2.0, lags
    print(f"answers {len(load.answers)}, switch lags {[round(x, 2) for x in lags]} s")


def test_a_damaged_version_is_not_loaded_and_the_old_one_serves(two_versions, tmp_path):
    registry, v1, v2 = two_versions
    with registry_service(registry, tmp_path / "serve.log") as url:
        # damaged after the promote's own check: the workers' load-time probe must refuse it
        registry.promote(v2)
        probe = Path(registry.store.version(v2).bundle) / "probe.npz"
        probe.write_bytes(probe.read_bytes()[:-100])
        time.sleep(0.1)
        registry.rollback()
        registry.store.activate(v2)  # straight to the database: no verification on this path
        time.sleep(2.0)
        for _ in range(6):
            r = httpx.get(f"{url}/readyz")
            assert r.status_code == 200
        answers = {httpx.post(f"{url}/predict", json={"images": digits_of(registry.version_dir(v1) / "bundle")})
                   .headers["x-model-version"] for _ in range(10)}
        assert answers == {v1}
        held = httpx.get(f"{url}/metadata").json()["worker"]
        assert any(v2 in reason for reason in held.get("not_loaded", []))


def test_the_open_inference_version_routes_follow_the_active_version(two_versions, tmp_path):
    registry, v1, v2 = two_versions
    with registry_service(registry, tmp_path / "serve.log") as url:
        name = httpx.get(f"{url}/metadata").json()["model"]["name"]
        image = np.asarray(digits_of(registry.active_bundle())[:1], dtype=np.float32)[:, None]
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape),
                            "data": image.reshape(-1).tolist()}], "outputs": [{"name": "label"}]}

        def answers(version: str) -> set[int]:
            """The statuses of a few requests (a new connection each, so both workers answer) to `version`."""
            with httpx.Client(timeout=30, headers={"Connection": "close"}) as http:
                return {http.post(f"{url}/v2/models/{name}/versions/{version}/infer", json=body).status_code
                        for _ in range(8)}

        assert answers(v1) == {200} and answers(v2) == {404}
        registry.promote(v2)
        deadline = time.monotonic() + 10
        while answers(v2) != {200} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answers(v2) == {200} and answers(v1) == {404}
        metadata = httpx.get(f"{url}/v2/models/{name}").json()
        assert metadata["versions"] == [v2]
        answer = httpx.post(f"{url}/v2/models/{name}/infer", json=body)
        assert answer.json()["model_version"] == answer.headers["x-model-version"] == v2
