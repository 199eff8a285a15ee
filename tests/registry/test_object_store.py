"""Versions in an S3 object store (registry/objects.py) against a real S3 server (SeaweedFS): register uploads,
a fresh cache downloads and verifies, a flipped byte or a truncated object is refused while the old version
keeps serving, and a missing bucket or missing credentials is one readable line."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from bundle.manifest import copy_as_version, read_bundle, sha256_file
from protoserve.settings import Settings, SettingsError
from registry.objects import CONTENT_DIGITS, ChecksumError, ObjectStore, ObjectStoreError, ObjectUrl, unpin
from registry.revision_settings import RevisionSettings
from registry.store import RegistryError
from registry.verdicts import verdict
from registry.versions import Registry
from service.demo import running_service
from service.review import app
from service.served_version import ActiveVersionFollower, refusal_reason
from worker.loop import run_worker

ROOT = Path(__file__).resolve().parents[2]


def replica(root: Path, url: str, cache: Path) -> Registry:
    """The registry as one host sees it: the shared database and object store, its own cache."""
    return Registry(root, versions_url=url, objects=ObjectStore(cache_dir=cache))


def stored(registry: Registry, version: str, name: str) -> str:
    """The object key of a registered version's file ("bundle/<file>" or "checkpoint.pt"), from its row:
    `<prefix>/<version>/<16 hex digits of the manifest's sha256>/...`."""
    url, _ = unpin(registry.store.version(version).bundle)
    return f"{url.key.removesuffix('/bundle')}/{name}"


def content(bundle: Path) -> str:
    return sha256_file(bundle / "manifest.json")[:CONTENT_DIGITS]


def flip_a_byte(s3, bucket: str, key: str) -> None:
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def test_register_uploads_and_a_fresh_cache_downloads_and_verifies(bucket, s3, tiny_bundle, tiny_checkpoint, tmp_path):
    url = f"s3://{bucket}/protoserve/versions"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-writer")
    row = writer.register(tiny_bundle, tiny_checkpoint)
    manifest_sha = sha256_file(tiny_bundle / "manifest.json")
    prefix = f"protoserve/versions/0.1.0/{content(tiny_bundle)}"  # the version, then its content
    assert row.bundle == f"s3://{bucket}/{prefix}/bundle#sha256={manifest_sha}"
    assert row.checkpoint == f"s3://{bucket}/{prefix}/checkpoint.pt#sha256={sha256_file(tiny_checkpoint)}"
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    expected = {f"{prefix}/bundle/{name}" for name in read_bundle(tiny_bundle).manifest.files}
    assert keys == expected | {f"{prefix}/bundle/manifest.json", f"{prefix}/checkpoint.pt"}
    assert not (tmp_path / "registry" / "versions").exists()  # nothing of the version on the registering disk

    other = replica(tmp_path / "registry", url, tmp_path / "cache-replica")
    path = other.bundle_path("0.1.0")
    assert path == tmp_path / "cache-replica" / "bundles" / manifest_sha  # content-addressed
    assert read_bundle(path).manifest.files == read_bundle(tiny_bundle).manifest.files  # every sha256 checked
    checkpoint = other.checkpoint_path("0.1.0")
    assert sha256_file(checkpoint) == sha256_file(tiny_checkpoint) and checkpoint.name == "checkpoint.pt"
    assert [p.name for p in (tmp_path / "cache-replica").iterdir() if p.name.startswith(".")] == []  # no leftovers
    other.promote("0.1.0", actor="test")  # verified (checksums, golden probe) from the cache
    assert other.store.active().version == "0.1.0"

    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/bundle/model.onnx")
    assert other.bundle_path("0.1.0") == path  # immutable: a cached version is never fetched again
    with pytest.raises(RegistryError, match="registered already"):
        writer.register(tiny_bundle, tiny_checkpoint)


def test_two_uploads_of_one_version_never_overwrite_each_other(bucket, s3, tiny_bundle, tiny_protopnet_bundle,
                                                               tmp_path):
    """Two registers of version 0.2.0 at once (a job attempt whose lease ran out and the attempt that took over):
    the first uploads, the second uploads other files, then the first writes its row. The row's objects are
    still the first's, so the version verifies."""
    versions = ObjectUrl.parse(f"s3://{bucket}/v")
    first, second = (copy_as_version(b, "0.2.0", tmp_path / n) for b, n in ((tiny_bundle, "a"),
                                                                           (tiny_protopnet_bundle, "b")))
    store = ObjectStore(cache_dir=tmp_path / "cache-writer")
    first_location, _ = store.upload_version(versions, "0.2.0", first, None)
    second_location, _ = store.upload_version(versions, "0.2.0", second, None)
    assert first_location != second_location
    fetched = ObjectStore(cache_dir=tmp_path / "cache-replica").bundle(first_location)  # checked against the pin
    assert read_bundle(fetched).manifest.family == "prototypedl"


def test_workers_sharing_a_cache_download_a_version_once(bucket, s3, tiny_bundle, tiny_checkpoint, tmp_path):
    """Another process (a replica's other worker) holds the version's download lock: this one waits, then reads
    the copy that process settled, without fetching (the objects are gone by then: a fetch would fail)."""
    writer = replica(tmp_path / "registry", f"s3://{bucket}/v", tmp_path / "cache-writer")
    location = writer.register(tiny_bundle, tiny_checkpoint).bundle
    _, pin = unpin(location)
    shared = tmp_path / "cache-shared"
    (shared / "locks").mkdir(parents=True)
    other_worker = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(shared / "locks" / pin)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other_worker.stdout.readline().strip() == "held"
        found = []
        waiting = threading.Thread(target=lambda: found.append(ObjectStore(cache_dir=shared).bundle(location)))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()  # waits on the other worker's download
        copy = ObjectStore(cache_dir=tmp_path / "cache-other").bundle(location)
        shutil.copytree(copy, shared / "bundles" / pin)  # what the other worker's download settles
        client = s3.client()
        for key in [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="v/")["Contents"]]:
            client.delete_object(Bucket=bucket, Key=key)
    finally:
        other_worker.communicate("", timeout=30)  # releases the lock
    waiting.join(30)
    assert found == [shared / "bundles" / pin]
    assert read_bundle(found[0]).manifest.version == "0.1.0"


def test_a_replica_fetches_the_versions_a_promote_may_pick_before_anyone_promotes(bucket, s3, tiny_bundle,
                                                                                   tiny_checkpoint, tmp_path):
    """The rollback target and the newest never-active versions are fetched into the cache ahead of a promote
    (the active one and old released ones are not); a damaged one is named, not cached, and the rest still
    arrive."""
    url = f"s3://{bucket}/v"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-writer")
    writer.register(tiny_bundle, tiny_checkpoint)
    for version in ("0.2.0", "0.3.0", "0.4.0", "0.5.0"):
        writer.register(copy_as_version(tiny_bundle, version, tmp_path / version), tiny_checkpoint, parent="0.1.0")
    writer.store.activate("0.1.0")
    writer.store.activate("0.2.0")  # released, and the rollback target once 0.3.0 is active
    writer.store.activate("0.3.0")
    serving = replica(tmp_path / "registry", url, tmp_path / "cache-replica")
    assert serving.likely_next(2) == ["0.2.0", "0.5.0", "0.4.0"]
    assert serving.likely_next(0) == ["0.2.0"]
    assert serving.likely_next(9) == ["0.2.0", "0.5.0", "0.4.0"]  # 0.1.0 and 0.3.0 were active once

    flip_a_byte(s3, bucket, stored(writer, "0.4.0", "bundle/model.onnx"))
    failed = serving.prefetch(serving.likely_next(2))
    assert list(failed) == ["0.4.0"] and "sha256" in failed["0.4.0"], failed
    cached = {p.name for p in (tmp_path / "cache-replica" / "bundles").iterdir()}
    assert cached == {sha256_file(tmp_path / v / "manifest.json") for v in ("0.2.0", "0.5.0")}
    assert [p.name for p in (tmp_path / "cache-replica").iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_a_flipped_byte_is_refused_and_the_old_version_keeps_serving(bucket, s3, tiny_bundle, tiny_checkpoint,
                                                                      tmp_path):
    url = f"s3://{bucket}/v"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-writer")
    writer.register(tiny_bundle, tiny_checkpoint)
    writer.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    writer.register(copy_as_version(tiny_bundle, "0.3.0", tmp_path / "v3"), tiny_checkpoint, parent="0.1.0")
    writer.promote("0.1.0")
    flip_a_byte(s3, bucket, stored(writer, "0.2.0", "bundle/model.onnx"))

    serving = replica(tmp_path / "registry", url, tmp_path / "cache-replica")
    switched = []
    follower = ActiveVersionFollower(serving, serving.store.active().generation, "0.1.0", switched.append)
    before = REGISTRY.get_sample_value("protoserve_version_refusals_total",
                                       {"version": "0.2.0", "reason": "checksum"}) or 0
    serving.store.activate("0.2.0")  # around promote's own verification, as a replica elsewhere would see it
    asyncio.run(follower.check())
    assert switched == [] and follower.version == "0.1.0"  # still serving the old version
    (reason,) = follower.failed.values()
    damaged = f"s3://{bucket}/{stored(writer, '0.2.0', 'bundle/model.onnx')}"
    assert reason.startswith(f"0.2.0: {damaged}: sha256 ") and "\n" not in reason
    assert "damaged, truncated or edited in the object store" in reason
    assert REGISTRY.get_sample_value("protoserve_version_refusals_total",
                                     {"version": "0.2.0", "reason": "checksum"}) == before + 1
    assert not (tmp_path / "cache-replica" / "bundles").exists()  # nothing unverified was cached
    with pytest.raises(RegistryError, match="0.2.0.*fails verification.*sha256"):
        replica(tmp_path / "registry", url, tmp_path / "cache-other").promote("0.2.0")

    # A truncated object, and an edited manifest (the row pins its sha256), are refused the same way.
    client = s3.client()
    probe = client.get_object(Bucket=bucket, Key=stored(writer, "0.3.0", "bundle/probe.npz"))["Body"].read()
    client.put_object(Bucket=bucket, Key=stored(writer, "0.3.0", "bundle/probe.npz"), Body=probe[: len(probe) // 2])
    with pytest.raises(ChecksumError, match="probe.npz: sha256"):
        serving.bundle_path("0.3.0")
    flip_a_byte(s3, bucket, stored(writer, "0.3.0", "bundle/manifest.json"))
    with pytest.raises(ChecksumError, match="manifest.json: sha256"):
        serving.bundle_path("0.3.0")

    serving.store.activate("0.3.0")
    client.put_object(Bucket=bucket, Key=stored(writer, "0.3.0", "bundle/manifest.json"),
                      Body=(tmp_path / "v3" / "manifest.json").read_bytes())
    client.put_object(Bucket=bucket, Key=stored(writer, "0.3.0", "bundle/probe.npz"), Body=probe)  # repaired
    asyncio.run(follower.check())
    assert [s.version for s in switched] == ["0.3.0"]


def test_an_object_store_that_could_not_be_read_is_tried_again(bucket, s3, tiny_bundle, tiny_checkpoint, tmp_path):
    url = f"s3://{bucket}/v"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-writer")
    writer.register(tiny_bundle, tiny_checkpoint)
    writer.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    writer.promote("0.1.0")
    writer.promote("0.2.0")  # checked on the writer; then an object goes missing (a store half restored)
    client = s3.client()
    missing = stored(writer, "0.2.0", "bundle/probe.npz")
    client.delete_object(Bucket=bucket, Key=missing)
    serving = replica(tmp_path / "registry", url, tmp_path / "cache-replica")
    switched = []
    follower = ActiveVersionFollower(serving, serving.store.active().generation - 1, "0.1.0", switched.append)
    asyncio.run(follower.check())
    (reason,) = follower.failed.values()
    assert reason == f"0.2.0: s3://{bucket}/{missing}: no such object (deleted from the store, or " \
                     "never uploaded)"
    client.put_object(Bucket=bucket, Key=missing, Body=(tiny_bundle / "probe.npz").read_bytes())
    asyncio.run(follower.check())
    assert switched == []  # not before the retry is due
    follower.retry_at = dict.fromkeys(follower.retry_at, 0.0)
    asyncio.run(follower.check())
    assert [s.version for s in switched] == ["0.2.0"] and follower.failed == {}


def test_the_review_api_reads_and_promotes_versions_from_the_object_store(bucket, s3, tiny_bundle, tiny_checkpoint,
                                                                           tmp_path, monkeypatch):
    url = f"s3://{bucket}/v"
    for name, value in {"PROTOSERVE_REGISTRY": str(tmp_path / "registry"), "PROTOSERVE_VERSIONS_URL": url,
                        "PROTOSERVE_CACHE_DIR": str(tmp_path / "cache"), "PROTOSERVE_ADMIN_KEY": "key"}.items():
        monkeypatch.setenv(name, value)
    registry = Registry(tmp_path / "registry")  # every setting from the environment, as the service's
    registry.register(tiny_bundle, tiny_checkpoint)
    registry.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    registry.promote("0.1.0")
    flip_a_byte(s3, bucket, stored(registry, "0.2.0", "bundle/probe.npz"))
    http, admin = TestClient(app, root_path=""), {"Authorization": "Bearer key"}
    prototypes = http.get("/api/versions/0.1.0/prototypes").json()["prototypes"]
    picture = http.get(prototypes[0]["pictures"]["prototype"].removeprefix("/review"))
    assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
    assert http.post("/api/verdicts", json={"prototype_id": 1, "verdict": "reject", "source": "ada"},
                     headers=admin).status_code == 201
    job = http.post("/api/jobs", json={"mode": "mask"}, headers=admin)  # checked against the parent's bundle
    assert job.status_code == 201, job.text
    refused = http.post("/api/promote", json={"version": "0.2.0"}, headers=admin)
    damaged = f"s3://{bucket}/{stored(registry, '0.2.0', 'bundle/probe.npz')}"
    assert refused.status_code == 409 and f"{damaged}: sha256" in refused.text
    assert registry.store.active().version == "0.1.0"


def test_missing_bucket_or_credentials_is_one_readable_line(bucket, s3, tiny_bundle, tmp_path, monkeypatch):
    registry = Registry(tmp_path / "registry", versions_url="s3://no-such-bucket-here/v",
                        objects=ObjectStore(cache_dir=tmp_path / "cache"))
    with pytest.raises(ObjectStoreError) as missing:
        registry.register(tiny_bundle)
    assert str(missing.value).startswith(f"s3://no-such-bucket-here/v/0.1.0/{content(tiny_bundle)}/bundle/")
    assert "no bucket 'no-such-bucket-here' at http://127.0.0.1:" in str(missing.value)
    assert registry.store.versions() == []  # no row without its objects

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    wrong = Registry(tmp_path / "registry", versions_url=f"s3://{bucket}/v", objects=ObjectStore())
    with pytest.raises(ObjectStoreError, match="access denied .* check AWS_ACCESS_KEY_ID and AWS_SECRET_ACC") as e:
        wrong.register(tiny_bundle)
    assert "wrong-secret" not in str(e.value) and refusal_reason(e.value) == "object_store"

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    cli = subprocess.run([sys.executable, "-m", "cli.main", "registry", "--registry", str(tmp_path / "cli-registry"),
                          "register", str(tiny_bundle)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PROTOSERVE_VERSIONS_URL": f"s3://{bucket}/v"})
    assert cli.returncode == 2, cli.stderr
    (line,) = cli.stderr.strip().splitlines()
    assert line.startswith(f"protoserve registry: error: s3://{bucket}/v/0.1.0/{content(tiny_bundle)}/bundle/")
    assert line.endswith(": no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def test_versions_url_setting_takes_a_folder_or_an_s3_url():
    assert Settings.from_env({"PROTOSERVE_VERSIONS_URL": "s3://bucket/a/b"}).versions_url == "s3://bucket/a/b"
    assert Settings.from_env({"PROTOSERVE_VERSIONS_URL": "/srv/versions"}).versions_url == "/srv/versions"
    for bad, says in (("gs://bucket/v", "gs:// is not supported"), ("s3:///v", "no bucket named")):
        with pytest.raises(SettingsError, match=f"PROTOSERVE_VERSIONS_URL: .*{says}"):
            Settings.from_env({"PROTOSERVE_VERSIONS_URL": bad})


def test_a_versions_folder_keeps_versions_outside_the_registry(tiny_bundle, tiny_checkpoint, tmp_path):
    registry = Registry(tmp_path / "registry", versions_url=str(tmp_path / "elsewhere"))
    row = registry.register(tiny_bundle, tiny_checkpoint)
    assert row.bundle == str(tmp_path / "elsewhere" / "0.1.0" / "bundle")
    assert registry.checkpoint_path("0.1.0") == tmp_path / "elsewhere" / "0.1.0" / "checkpoint.pt"
    assert read_bundle(registry.bundle_path("0.1.0")).manifest.version == "0.1.0"


def test_a_worker_revises_from_the_object_store_and_uploads_its_candidate(bucket, s3, tiny_bundle, tiny_checkpoint,
                                                                          mnist_root, tmp_path):
    url = f"s3://{bucket}/v"
    registry = replica(tmp_path / "registry", url, tmp_path / "cache-worker")
    registry.register(tiny_bundle, tiny_checkpoint)
    registry.promote("0.1.0")
    registry.store.add_verdict("0.1.0", verdict(1, "reject", 1, "ada"))
    job = registry.store.add_job("0.1.0", RevisionSettings(mode="mask", rounds=1))
    assert run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None) == 1
    done = registry.store.job(job["id"])
    assert done["status"] == "done", done["error"]
    candidate = registry.store.version(done["result"]["candidate"])
    prefix = f"v/{candidate.version}/{unpin(candidate.bundle)[1][:CONTENT_DIGITS]}"
    assert candidate.bundle.startswith(f"s3://{bucket}/{prefix}/bundle#sha256=")
    assert candidate.checkpoint.startswith(f"s3://{bucket}/{prefix}/checkpoint.pt#sha256=")
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=f"v/{candidate.version}/")["Contents"]}
    assert {f"{prefix}/bundle/manifest.json", f"{prefix}/checkpoint.pt"} <= keys
    parent_checkpoint = sha256_file(tiny_checkpoint)  # the worker revised a verified download of the parent's
    assert (tmp_path / "cache-worker" / "files" / parent_checkpoint / "checkpoint.pt").is_file()

    elsewhere = replica(tmp_path / "registry", url, tmp_path / "cache-replica")
    revised = read_bundle(elsewhere.bundle_path(candidate.version)).manifest
    assert revised.lineage.parent.endswith(":0.1.0") and revised.lineage.masked == [1]
    elsewhere.promote(candidate.version)


@pytest.mark.slow
def test_two_replicas_one_refuses_a_damaged_download_and_keeps_serving(bucket, s3, tiny_bundle, tiny_checkpoint,
                                                                       tmp_path):
    """Two `bentoml serve` replicas, each with its own cache, on one registry and one object store, under load.
    Replica A shares the promoting host's cache, which checked version 0.2.0 before its object was damaged;
    replica B (started after the damage) downloads the damaged object, refuses it and keeps serving 0.1.0."""
    url = f"s3://{bucket}/v"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-a")
    writer.register(tiny_bundle, tiny_checkpoint)
    writer.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    writer.register(copy_as_version(tiny_bundle, "0.3.0", tmp_path / "v3"), tiny_checkpoint, parent="0.1.0")
    writer.promote("0.1.0")
    with np.load(tiny_bundle / "probe.npz") as probe:
        images = probe["input.image"][:2, 0].tolist()

    def env(cache: str, workers: int) -> dict[str, str]:
        return {**s3.env(), "PROTOSERVE_REGISTRY": str(writer.root), "PROTOSERVE_VERSIONS_URL": url,
                "PROTOSERVE_CACHE_DIR": str(tmp_path / cache), "PROTOSERVE_WORKERS": str(workers),
                "PROTOSERVE_POLL_SECONDS": "0.2", "BENTOML_HOME": str(tmp_path / f"bentoml-{cache}")}

    writer.verify("0.2.0")  # the promote's check passes on the promoting host's download ...
    damaged = stored(writer, "0.2.0", "bundle/model.onnx")
    flip_a_byte(s3, bucket, damaged)  # ... then the object is damaged (before replica B
    # starts: a replica fetches the versions a promote may pick next as soon as it runs)
    with running_service(tiny_bundle, None, tmp_path / "a.log", 180, env=env("cache-a", 1)) as a, \
            running_service(tiny_bundle, None, tmp_path / "b.log", 180, env=env("cache-b", 2)) as b, \
            Clients({"a": a, "b": b}, images) as load:
        writer.promote("0.2.0")
        load.wait_for({"a": "0.2.0", "b": "0.1.0"})
        reasons = _wait_for_refusals(b, "0.2.0")
        assert all(f"s3://{bucket}/{damaged}: sha256" in r for r in reasons), reasons
        metrics = httpx.get(f"{b}/metrics").text
        assert 'protoserve_version_refusals_total{reason="checksum",version="0.2.0"} 2.0' in metrics, \
            [line for line in metrics.splitlines() if "refusals" in line]
        promtool = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True,
                                  timeout=60)  # Debian's prometheus package (make test installs it)
        assert promtool.returncode == 0, promtool.stdout + promtool.stderr
        assert "protoserve_version_refusals_total{" not in httpx.get(f"{a}/metrics").text
        writer.promote("0.3.0")  # an intact version: every worker downloads it (or finds it cached) and switches
        load.wait_for({"a": "0.3.0", "b": "0.3.0"})
    assert load.errors == [], load.errors[:5]
    assert {v for r, v in load.answers if r == "b"} == {"0.1.0", "0.3.0"}  # B never served the damaged copy
    assert {v for r, v in load.answers if r == "a"} == {"0.1.0", "0.2.0", "0.3.0"}
    for cache, versions in (("cache-a", (tiny_bundle, tmp_path / "v2", tmp_path / "v3")),
                            ("cache-b", (tiny_bundle, tmp_path / "v3"))):
        assert sorted(p.name for p in (tmp_path / cache / "bundles").iterdir()) == sorted(
            sha256_file(v / "manifest.json") for v in versions)


class Clients:
    """Two clients per replica posting /predict until the block ends; answers as (replica, version)."""

    def __init__(self, replicas: dict[str, str], images: list):
        self.replicas, self.images, self.answers, self.errors = replicas, images, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(name,), daemon=True)
                        for name in replicas for _ in range(2)]

    def client(self, name: str) -> None:
        with httpx.Client(timeout=30, headers={"Connection": "close"}) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(f"{self.replicas[name]}/predict", json={"images": self.images})
                    if r.status_code != 200:
                        self.errors.append((name, r.status_code, r.text[:200]))
                    else:
                        self.answers.append((name, r.headers["x-model-version"]))
                except httpx.HTTPError as e:
                    self.errors.append((name, repr(e)))

    def wait_for(self, versions: dict[str, str], timeout: float = 30) -> None:
        """Until the last answers of each replica are all from the version named for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            start = len(self.answers)
            time.sleep(0.5)
            recent = self.answers[start:]
            if all({v for r, v in recent if r == name} == {version} for name, version in versions.items()):
                return
        raise AssertionError(f"not every replica on {versions} within {timeout} s: {self.answers[-8:]}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _wait_for_refusals(service: str, version: str, timeout: float = 20) -> list[str]:
    """The not-loaded reasons of both workers (each /metadata answer is one worker's)."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < 2:
        held = httpx.get(f"{service}/metadata", headers={"Connection": "close"}).json()["worker"]
        assert held["model"]["version"] == "0.1.0"
        refused = [r for r in held.get("not_loaded", []) if r.startswith(f"{version}: ")]
        if refused:
            seen[held["worker"]] = refused[-1]
        time.sleep(0.1)
    assert len(seen) == 2, seen
    return list(seen.values())


@pytest.mark.slow
def test_two_replicas_on_postgresql_and_s3_follow_ten_switches_within_a_second(bucket, s3, postgres_server,
                                                                               tiny_bundle, tiny_checkpoint,
                                                                               tmp_path, monkeypatch):
    """Issue 22's must-show: two `bentoml serve` replicas (two workers each) on one PostgreSQL registry and one
    object store, 8 clients posting /predict; 10 promotes and rollbacks, no error, every answer from one of the
    two versions, and every worker of both replicas on the new version within 1 s (p99, from the commit). The
    poll is set to 5 s, so only the LISTEN/NOTIFY push can meet the second. Each replica has fetched 0.2.0 before
    the first promote (at start), and a version registered while they run (0.3.0) too (on its NOTIFY)."""
    from test_live_switch import Load, wait_all_workers_on

    db = postgres_server.create_database(f"replicas_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("PROTOSERVE_REGISTRY_DB", db)
    url = f"s3://{bucket}/v"
    writer = replica(tmp_path / "registry", url, tmp_path / "cache-w")
    writer.register(tiny_bundle, tiny_checkpoint)
    writer.register(copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2"), tiny_checkpoint, parent="0.1.0")
    writer.promote("0.1.0")
    with np.load(tiny_bundle / "probe.npz") as probe:
        images = probe["input.image"][:2, 0].tolist()

    def env(name: str) -> dict[str, str]:
        return {**s3.env(), "PROTOSERVE_REGISTRY": str(writer.root), "PROTOSERVE_REGISTRY_DB": db,
                "PROTOSERVE_VERSIONS_URL": url, "PROTOSERVE_CACHE_DIR": str(tmp_path / f"cache-{name}"),
                "PROTOSERVE_WORKERS": "2", "PROTOSERVE_POLL_SECONDS": "5",
                "BENTOML_HOME": str(tmp_path / f"bentoml-{name}")}

    lags = []
    with running_service(tiny_bundle, None, tmp_path / "a.log", 180, env=env("a")) as a, \
            running_service(tiny_bundle, None, tmp_path / "b.log", 180, env=env("b")) as b, \
            Load(a, images, clients=4) as load_a, Load(b, images, clients=4) as load_b:
        writer.register(copy_as_version(tiny_bundle, "0.3.0", tmp_path / "v3"), tiny_checkpoint, parent="0.1.0")
        fetched = [tmp_path / f"cache-{name}" / "bundles" / sha256_file(tmp_path / version / "manifest.json")
                   for name in "ab" for version in ("v2", "v3")]
        deadline = time.monotonic() + 30
        while not all(path.is_dir() for path in fetched) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(path.is_dir() for path in fetched), [p for p in fetched if not p.is_dir()]
        writer.verify("0.2.0")  # the promoting host's own download and check, before the clock starts at the commit
        time.sleep(1.0)
        for i in range(10):
            committed = time.monotonic()
            writer.promote("0.2.0" if i % 2 == 0 else "0.1.0") if i < 9 else writer.rollback()
            target = writer.store.active().version
            lags.append(max(wait_all_workers_on(load, target, committed) for load in (load_a, load_b)))
            time.sleep(0.3)
    for load in (load_a, load_b):
        assert not load.errors, load.errors[:5]
        assert {v for _, _, v in load.answers} == {"0.1.0", "0.2.0"}
    p99 = float(np.percentile(lags, 99))
    print(f"answers {len(load_a.answers) + len(load_b.answers)}, switch lags {[round(x, 3) for x in lags]} s, "
          f"p99 {p99:.3f} s")
    assert p99 < 1.0, lags
