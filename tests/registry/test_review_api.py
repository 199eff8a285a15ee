"""The review API (service/review.py) on a real registry: reads, verdicts, jobs, promote, rollback, and the
admin key in front of every change."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bundle.manifest import read_bundle
from registry.job_failures import FAILURES
from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict
from service.review import app

KEY = "s3cret-admin-key"


@pytest.fixture
def client(two_versions, monkeypatch):
    registry, v1, v2 = two_versions
    monkeypatch.setenv("PROTOSERVE_REGISTRY", str(registry.root))
    monkeypatch.setenv("PROTOSERVE_ADMIN_KEY", KEY)
    return TestClient(app, root_path=""), registry


def admin(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def snapshot(registry) -> dict:
    """Everything the database holds."""
    return registry.store.dump()


def changing_routes(registry) -> list[tuple[str, dict | None]]:
    verdict_id = registry.store.add_verdict("0.1.0", verdict(2, "reject", 1, "seed"))["id"]
    return [("/api/verdicts", {"prototype_id": 1, "verdict": "reject", "source": "ada"}),
            (f"/api/verdicts/{verdict_id}/withdraw", None),
            ("/api/jobs", {"mode": "mask"}),
            ("/api/promote", {"version": "0.2.0"}),
            ("/api/rollback", None)]


@pytest.mark.parametrize("headers, status", [({}, 401), (admin("wrong-key"), 401), (admin(KEY + "x"), 401),
                                             ({"Authorization": KEY}, 401), ({"Authorization": "Basic x"}, 401)])
def test_every_changing_route_refuses_a_missing_or_wrong_key_and_changes_nothing(client, headers, status):
    http, registry = client
    routes = changing_routes(registry)
    registry.promote("0.2.0")  # so that rollback would have something to do
    before, active = snapshot(registry), registry.store.active()
    for path, body in routes:
        r = http.post(path, json=body, headers=headers)
        assert r.status_code == status, (path, r.text)
        assert r.json()["reason"] == "unauthorized" and KEY not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    assert snapshot(registry) == before and registry.store.active() == active


def test_with_no_key_configured_changing_routes_are_closed(client, monkeypatch):
    http, registry = client
    routes = changing_routes(registry)
    monkeypatch.delenv("PROTOSERVE_ADMIN_KEY")
    before = snapshot(registry)
    for path, body in routes:
        r = http.post(path, json=body, headers=admin())
        assert r.status_code == 403 and r.json()["reason"] == "changes_closed", (path, r.text)
    assert snapshot(registry) == before


def test_review_flow_with_the_key(client):
    http, registry = client
    listed = http.get("/api/versions").json()
    assert listed["active"] == "0.1.0" and {v["version"] for v in listed["versions"]} == {"0.1.0", "0.2.0"}
    r = http.post("/api/verdicts", json={"prototype_id": 3, "verdict": "reject", "source": "ada", "note": "blob"},
                  headers=admin())
    assert r.status_code == 201 and r.json()["version"] == "0.1.0" and r.json()["id"] > 0
    protos = http.get("/api/versions/0.1.0/prototypes").json()
    row = next(p for p in protos["prototypes"] if p["id"] == 3)
    assert row["verdict"]["verdict"] == "reject" and protos["open_verdicts"] == 1
    assert isinstance(row["weight"], float) and row["class_name"]
    manifest = read_bundle(registry.store.version("0.1.0").bundle).manifest
    expected = {p.id: p.figures for p in manifest.quality.prototypes}.get(3) if manifest.quality else None
    assert row["quality"] == expected  # the bundle's explanation-quality figures, when it has the report
    picture = http.get(row["pictures"]["prototype"].removeprefix("/review"))
    assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
    assert http.get("/api/versions/0.1.0/files/manifest.json").status_code == 404
    withdrawn = http.post(f"/api/verdicts/{r.json()['id']}/withdraw", headers=admin())
    assert withdrawn.status_code == 200 and withdrawn.json()["withdrawn_at"]
    assert http.get("/api/versions/active/prototypes").json()["open_verdicts"] == 0
    assert http.post("/api/jobs", json={"mode": "revise"}, headers=admin()).status_code == 409  # nothing to use
    http.post("/api/verdicts", json={"prototype_id": 4, "verdict": "reject", "source": "ada"}, headers=admin())
    job = http.post("/api/jobs", json={"mode": "mask"}, headers=admin())
    assert job.status_code == 201 and job.json()["status"] == "queued"
    assert http.get(f"/api/jobs/{job.json()['id']}").json()["settings"]["mode"] == "mask"
    assert http.post("/api/promote", json={"version": "0.2.0"}, headers=admin()).json()["active"] == "0.2.0"
    assert http.post("/api/rollback", headers=admin()).json()["active"] == "0.1.0"


def test_bad_requests_name_the_problem(client):
    http, _ = client
    cases = [({"prototype_id": 999, "verdict": "reject", "source": "ada"}, 400),
             ({"prototype_id": 1, "verdict": "maybe", "source": "ada"}, 422),
             ({"prototype_id": 1, "verdict": "reject", "source": "ada", "version": "7.7.7"}, 404),
             ({"prototype_id": 1, "verdict": "reject", "source": "ada", "extra": 1}, 422)]
    for body, status in cases:
        assert http.post("/api/verdicts", json=body, headers=admin()).status_code == status, body
    assert http.post("/api/promote", json={"version": "7.7.7"}, headers=admin()).status_code == 404
    assert http.post("/api/verdicts/12345/withdraw", headers=admin()).status_code == 404


def test_a_job_body_is_the_revision_settings(client):
    """POST /api/jobs takes registry/revision_settings.py RevisionSettings: its refusals name the field."""
    http, _ = client
    cases = [({"rounds": 0}, "greater than or equal to 1"), ({"train_subset": 0}, "train subset 0"),
             ({"mode": "erase"}, "'mask', 'prune' or 'revise'"), ({"rounds": "2"}, "valid integer"),
             ({"epochs": 2}, "Extra inputs")]
    for body, message in cases:
        answer = http.post("/api/jobs", json=body, headers=admin())
        assert answer.status_code == 422 and message in answer.text, (body, answer.text)
    document = app.openapi()["components"]["schemas"]["JobIn"]["properties"]
    assert set(RevisionSettings.model_fields) < set(document) and document["rounds"]["description"]


def test_an_option_the_family_cannot_take_is_refused_up_front(protopnet_registry, monkeypatch):
    """A ProtoPNet pushes each prototype onto a training image of its class: fewer training images than
    classes cannot revise it. 400 naming why; no job queued, the verdicts stay open."""
    monkeypatch.setenv("PROTOSERVE_REGISTRY", str(protopnet_registry.root))
    monkeypatch.setenv("PROTOSERVE_ADMIN_KEY", KEY)
    http = TestClient(app, root_path="")
    http.post("/api/verdicts", json={"prototype_id": 4, "verdict": "reject", "source": "ada"}, headers=admin())
    assert http.get("/api/versions/0.1.0/prototypes").json()["min_train_subset"] == 10
    for mode in ("mask", "prune", "revise"):
        r = http.post("/api/jobs", json={"mode": mode, "train_subset": 5}, headers=admin())
        assert r.status_code == 400 and r.json()["reason"] == "train_subset_too_small", r.text
        assert "at least 10 images" in r.json()["error"]
    assert protopnet_registry.store.jobs() == [] and protopnet_registry.store.open_verdict_counts() == {"0.1.0": 1}
    assert http.post("/api/jobs", json={"mode": "mask", "train_subset": 10}, headers=admin()).status_code == 201


def test_a_prototypedl_takes_any_training_subset(client):
    http, registry = client
    assert http.get("/api/versions/0.1.0/prototypes").json()["min_train_subset"] == 1
    http.post("/api/verdicts", json={"prototype_id": 4, "verdict": "reject", "source": "ada"}, headers=admin())
    assert http.post("/api/jobs", json={"mode": "mask", "train_subset": 5}, headers=admin()).status_code == 201


def test_a_failed_job_says_what_to_do(client, mnist_root):
    """GET /api/jobs/{id} of a failed job: `reason` for the reviewer, `error` (and the log) for the detail."""
    from worker.loop import run_worker

    http, registry = client
    http.post("/api/verdicts", json={"prototype_id": 4, "verdict": "reject", "source": "ada"}, headers=admin())
    job = http.post("/api/jobs", json={"mode": "mask"}, headers=admin()).json()
    Path(registry.store.version("0.1.0").checkpoint).unlink()
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    failed = http.get(f"/api/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["reason"] == FAILURES["checkpoint"]
    assert failed["error"].startswith("CheckpointError: ") and failed["error"] in failed["log"]


def test_without_a_registry_the_routes_say_so(monkeypatch):
    monkeypatch.delenv("PROTOSERVE_REGISTRY", raising=False)
    r = TestClient(app).get("/api/versions")
    assert r.status_code == 409 and "PROTOSERVE_REGISTRY" in r.json()["error"]


def test_a_method_a_path_does_not_take_is_405_naming_all_it_takes(client):
    http, _ = client
    for method, path, allow in (("OPTIONS", "/api/verdicts", "GET, POST"), ("DELETE", "/api/promote", "POST"),
                                ("PUT", "/api/versions", "GET")):
        r = http.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)


def test_an_unreachable_database_is_a_503_naming_it_without_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOSERVE_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("PROTOSERVE_REGISTRY_DB", "postgresql://nobody:secret@127.0.0.1:1/registry")
    answer = TestClient(app, root_path="").get("/api/versions")
    assert answer.status_code == 503 and answer.json()["reason"] == "registry_unavailable"
    assert "127.0.0.1:1/registry" in answer.json()["error"] and "secret" not in answer.text
    assert "503" in app.openapi()["paths"]["/api/versions"]["get"]["responses"]  # documented, for clients
