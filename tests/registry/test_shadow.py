"""Shadow evaluation: a version run beside the active one on sampled /predict traffic, off the response path."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.demo import running_service
from service.shadow import compare, top_prototype

KEY = "shadow-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_compare_counts_agreement_changes_and_out_of_domain():
    distances = np.array([[0.1, 0.2, 0.3], [0.5, 0.4, 0.0]])
    active = np.array([True, True, False])
    ids = np.array([7, 8, 9])
    assert top_prototype(distances, active, ids).tolist() == [7, 8]  # the masked one is never cited
    served = (np.array([1, 2, 3]), np.array([7, 8, 7]), np.array([True, True, False]))
    shadow = (np.array([1, 5, 3]), np.array([7, 7, 7]), np.array([True, False, False]))
    c = compare(served, shadow)
    assert (c.images, c.same_label, c.same_prototype, c.same_in_domain) == (3, 2, 2, 2)
    assert c.changed == [(2, 5)] and c.out_of_domain == (1, 2)
    assert compare(served, (*shadow[:2], None)).same_in_domain is None



@pytest.mark.slow
@pytest.mark.registry_engines("sqlite")  # the shadow row on both engines: test_registry.py
def test_a_shadow_is_compared_on_live_traffic_and_never_touches_the_answers(two_versions, tmp_path):
    registry, v1, v2 = two_versions
    env = {"PROTOSERVE_REGISTRY": str(registry.root), "PROTOSERVE_WORKERS": "2", "PROTOSERVE_ADMIN_KEY": KEY,
           "BENTOML_HOME": str(tmp_path / "bentoml_home")}
    with np.load(Path(registry.active_bundle()) / "probe.npz") as probe:
        images = probe["input.image"][:, 0].tolist()
    with running_service(registry.active_bundle(), None, tmp_path / "serve.log", 180, env=env) as url:
        before = httpx.post(f"{url}/predict", json={"images": images}).json()["predictions"]
        assert httpx.post(f"{url}/review/api/shadow", json={"version": v2, "sample": 1.0}).status_code == 401
        assert httpx.post(f"{url}/review/api/shadow", json={"version": v1}, headers=AUTH).status_code == 409
        started = httpx.post(f"{url}/review/api/shadow", json={"version": v2, "sample": 1.0}, headers=AUTH)
        assert started.status_code == 200 and started.json()["version"] == v2
        time.sleep(3.0)  # every worker polls (0.5 s) and loads the shadow (verify, warm up)
        with httpx.Client(timeout=30, headers={"Connection": "close"}) as http:  # both workers answer
            for _ in range(20):
                answer = http.post(f"{url}/predict", json={"images": images})
                assert answer.status_code == 200 and answer.headers["x-model-version"] == v1
                assert answer.json()["predictions"] == before  # the answers are the served version's
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            figures = httpx.get(f"{url}/review/api/shadow").json()["figures"]
            if figures["images"] >= 20 * len(images):
                break
            time.sleep(0.2)
        assert figures["images"] >= 20 * len(images), figures
        # v2 is v1's weights under another name: it agrees everywhere
        assert figures["agreement"]["label"] == figures["agreement"]["prototype"] == 1.0, figures
        assert figures["changed_answers"] == [] and figures["failures"] == 0
        assert figures["mean_seconds"] > 0
        metrics = httpx.get(f"{url}/metrics").text
        assert f'protoserve_shadow_agreed_total{{version="{v2}",what="label"}}' in metrics
        ended = httpx.request("DELETE", f"{url}/review/api/shadow", headers=AUTH).json()
        assert ended["version"] is None
        # promoting the shadow version ends the shadow
        httpx.post(f"{url}/review/api/shadow", json={"version": v2, "sample": 0.5}, headers=AUTH)
        assert httpx.post(f"{url}/review/api/promote", json={"version": v2}, headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/review/api/shadow").json()["version"] is None
