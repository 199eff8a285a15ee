"""Revision jobs: a worker revises the parent from its checkpoint and registers a candidate; a killed
worker's job is resumed by the next one (or failed with the reason), never left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bundle.manifest import copy_as_version
from registry.job_failures import FAILURES
from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict
from revision.revise import revise_version
from worker.loop import run_worker

# On SQLite only (slow; revision jobs end to end; claiming on PostgreSQL: test_worker_pool.py)
pytestmark = [pytest.mark.slow, pytest.mark.registry_engines("sqlite")]


def queue_revision(registry, rejected=(1, 4), **settings):
    for j in rejected:
        registry.store.add_verdict("0.1.0", verdict(j, "reject", 1, "ada", note="background"))
    return registry.store.add_job("0.1.0", RevisionSettings(**{"mode": "revise", "rounds": 1, "epochs_per_round": 1,
                                                                "freeze_encoder": True, **settings}))


def test_worker_registers_a_candidate_with_its_comparison(protopnet_registry, mnist_root):
    registry = protopnet_registry
    job = queue_revision(registry)
    lines = []
    assert run_worker(registry, str(mnist_root), once=True, lease=30, log=lines.append) == 1
    done = registry.store.job(job["id"])
    assert done["status"] == "done", done["error"]
    candidate = registry.store.version(done["result"]["candidate"])
    assert candidate.status == "candidate" and candidate.parent == "0.1.0" and candidate.checkpoint
    assert candidate.lineage["mode"] == "revise" and candidate.lineage["parent"].endswith(":0.1.0")
    assert {v["prototype_id"] for v in candidate.lineage["verdicts"]} == {1, 4}
    assert set(done["result"]["comparison"]["accuracy"]) == {"parent", "revised"}
    assert done["progress"]["stage"] == "done" and done["progress"]["round"] == 1
    assert "round 1" in done["log"]
    near = registry.neighbours(candidate.version)["nearest"]
    assert len(near) == 20 and all(len(found) == 3 for found in near.values())  # the tiny ProtoPNet's 20
    assert registry.store.active().version == "0.1.0"  # promotion is explicit
    registry.promote(candidate.version)
    assert registry.store.active().version == candidate.version


def test_a_job_with_a_train_subset_revises_on_that_many_images(protopnet_registry, mnist_root):
    from training.checkpoint import read_checkpoint

    registry = protopnet_registry
    parent_subset = read_checkpoint(registry.store.version("0.1.0").checkpoint)["config"]["data"]["train_subset"]
    job = queue_revision(registry, train_subset=parent_subset // 5)
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    done = registry.store.job(job["id"])
    assert done["status"] == "done", done["error"]
    revised = read_checkpoint(registry.store.version(done["result"]["candidate"]).checkpoint)
    assert revised["config"]["data"]["train_subset"] == parent_subset // 5


def test_automatic_promotion_only_through_the_gates(protopnet_registry, mnist_root):
    registry = protopnet_registry
    job = queue_revision(registry, mode="mask", auto_promote=True, max_accuracy_drop=1.0)
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    result = registry.store.job(job["id"])["result"]
    assert result["promoted"] and registry.store.active().version == result["candidate"]


class Quiet:
    """A job report that keeps nothing (revise_version called as a worker would, without one)."""

    def log(self, line):
        pass

    def stage(self, name):
        pass

    def record(self, event):
        pass


def test_a_retry_after_the_candidate_was_registered_finishes_the_job(protopnet_registry, mnist_root):
    """A worker stopped after registering (and promoting) its candidate, before it marked the job done: the
    next attempt recognises its own candidate (the version this job registered) and finishes the job: no
    second revision, no "registered already", no second promote."""
    registry = protopnet_registry
    job = queue_revision(registry, mode="mask", auto_promote=True, max_accuracy_drop=1.0)
    assert registry.store.claim_job("stopped-worker", 0.5)["id"] == job["id"]
    revise_version(registry, job["id"], "0.1.0", registry.store.job_settings(job["id"]), str(mnist_root), Quiet())
    candidate = f"0.1.0-r{job['id']}"
    assert registry.store.version(candidate).job_id == job["id"]
    assert registry.store.active().version == candidate
    time.sleep(0.6)  # then the worker is gone: its lease runs out

    assert run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None) == 1
    done = registry.store.job(job["id"])
    assert done["status"] == "done", done["error"]
    assert done["attempts"] == 2
    assert done["result"]["candidate"] == candidate and done["result"]["promoted"]
    assert done["result"]["parity"]["images"] > 0  # from the registered bundle's manifest
    assert "registered by an earlier attempt of this job" in done["log"]
    assert [v.version for v in registry.store.versions()] == ["0.1.0", candidate]
    assert [c["version"] for c in registry.store.changes() if c["action"] == "promote"] == ["0.1.0", candidate]


def test_the_candidate_s_version_registered_by_someone_else_fails_the_job(protopnet_registry, mnist_root, tmp_path):
    registry = protopnet_registry
    job = queue_revision(registry, mode="mask")
    taken = f"0.1.0-r{job['id']}"
    registry.register(copy_as_version(registry.bundle_path("0.1.0"), taken, tmp_path / "taken"), parent="0.1.0")
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    failed = registry.store.job(job["id"])
    assert failed["status"] == "failed"
    assert f"version '{taken}' is registered already, by hand (no job), not by job {job['id']}" in failed["error"]
    assert registry.store.version(taken).job_id is None  # the other version stays as it was


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_failing_job_tells_the_reviewer_what_to_do(protopnet_registry, mnist_root, damage):
    registry = protopnet_registry
    job = queue_revision(registry)
    checkpoint = registry.store.version("0.1.0").checkpoint
    if damage == "deleted":
        os.remove(checkpoint)
    else:
        with open(checkpoint, "r+b") as f:
            f.truncate(100)
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    failed = registry.store.job(job["id"])
    assert failed["status"] == "failed" and "checkpoint" in failed["error"].lower()
    assert failed["reason"] == FAILURES["checkpoint"]  # one sentence: what failed, what to change
    assert f"failed (checkpoint): CheckpointError: {checkpoint}" in failed["log"]  # the detail, for the log


def test_a_training_subset_missing_a_class_is_failed_before_training(protopnet_registry, mnist_root):
    registry = protopnet_registry
    job = queue_revision(registry, train_subset=5)  # five images cannot hold all ten digits
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    failed = registry.store.job(job["id"])
    assert failed["status"] == "failed" and "TrainSubsetError" in failed["error"]
    assert failed["reason"].startswith("The training subset of 5 images has no example of class ")
    assert failed["reason"].endswith("; use a larger train_subset.")
    assert failed["progress"]["round"] == 0  # refused before any training


def test_a_killed_worker_leaves_the_job_to_the_next_one(protopnet_registry, mnist_root, tmp_path):
    registry = protopnet_registry
    job = queue_revision(registry, rounds=2, epochs_per_round=2)
    cmd = [sys.executable, "-m", "cli.main", "worker", "--registry", str(registry.root), "--data-root",
           str(mnist_root), "--lease", "2", "--poll", "0.2"]
    with open(tmp_path / "worker.log", "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while registry.store.job(job["id"])["progress"] is None or \
            registry.store.job(job["id"])["progress"].get("stage") != "revising":
        assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "worker.log").read_text()
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert registry.store.job(job["id"])["status"] == "running"  # until its lease runs out
    time.sleep(2.5)
    run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None)
    finished = registry.store.job(job["id"])
    assert finished["status"] == "done" and finished["attempts"] == 2, finished["error"]
