"""Four `protoserve worker` processes on one PostgreSQL registry: every queued mask job done exactly once,
none claimed twice (claim_job's FOR UPDATE SKIP LOCKED), and the job of a worker SIGKILLed mid-job
finished by another once its lease ran out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict

# The claim path under real concurrency is the same on SQLite (one write lock) and tested there through
# test_registry.py's claimants; the processes here are the PostgreSQL deployment's shape.
pytestmark = [pytest.mark.slow, pytest.mark.registry_engines("postgresql")]

# Each mask job exports and checks a candidate (~3 s of CPU on an idle machine, besides each worker's start):
# CI runs 8 jobs (297 s for 12 at load 6-10); the 40 with WORKER_POOL_JOBS=40 (docs/results.md).
JOBS, WORKERS, LEASE = int(os.environ.get("WORKER_POOL_JOBS", 8)), 4, 3
TESTS = Path(__file__).resolve().parents[1]


def test_four_workers_run_every_mask_job_exactly_once_and_survive_a_sigkill(two_versions, mnist_root, tmp_path):
    registry, v1, _ = two_versions
    queued = []
    for i in range(JOBS):  # each job takes the one open verdict given just before it
        registry.store.add_verdict(v1, verdict(i % 5, "reject", 1, "ada"))
        queued.append(registry.store.add_job(v1, RevisionSettings(mode="mask", rounds=1))["id"])
    cmd = [sys.executable, str(TESTS / "registry" / "small_worker.py"), "--registry", str(registry.root),
           "--data-root", str(mnist_root), "--lease", str(LEASE), "--poll", "0.2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    workers = {}
    for n in range(WORKERS):
        with open(tmp_path / f"worker{n}.log", "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        workers[process.pid] = process
    started = time.monotonic()
    try:
        victim = None
        while victim is None:  # the first job seen mid-revision: its worker is killed
            assert time.monotonic() - started < 120, "no job reached its revision"
            for job in registry.store.jobs():
                if job["status"] == "running" and (job["progress"] or {}).get("stage") == "revising":
                    pid = int(job["worker"].rsplit(":", 1)[1])
                    workers[pid].send_signal(signal.SIGKILL)
                    workers[pid].wait()
                    victim = job
                    break
            time.sleep(0.05)
        while any(j["status"] in ("queued", "running") for j in registry.store.jobs()):
            assert time.monotonic() - started < 900, [(j["id"], j["status"]) for j in registry.store.jobs()]
            assert any(p.poll() is None for p in workers.values()), "every worker exited"
            time.sleep(0.5)
        elapsed = time.monotonic() - started
    finally:
        for process in workers.values():
            process.kill()
            process.wait()
    jobs = {j["id"]: j for j in registry.store.jobs()}
    assert sorted(jobs) == queued
    assert all(j["status"] == "done" for j in jobs.values()), {i: j["error"] for i, j in jobs.items() if j["error"]}
    # claim_job counts every claim: once for each job, twice for the one whose worker was killed
    assert {i: j["attempts"] for i, j in jobs.items()} == {i: 2 if i == victim["id"] else 1 for i in queued}
    assert jobs[victim["id"]]["worker"] != victim["worker"]  # finished by another worker
    candidates = [row.job_id for row in registry.store.versions() if row.job_id is not None]
    assert sorted(candidates) == queued  # one candidate version per job: none done twice
    assert len({j["worker"] for j in jobs.values()} - {victim["worker"]}) == WORKERS - 1  # each survivor took jobs
    print(f"{JOBS} mask jobs on {WORKERS} workers (one killed mid-job) in {elapsed:.1f} s")
