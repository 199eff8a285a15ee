"""Without a server: the follower's switching rules, and a revision job's progress from its callback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict
from revision.rounds import ProgressEvent, eta_seconds
from service.served_version import ActiveVersionFollower
from worker.loop import Heartbeat


def test_follower_switches_on_a_new_generation_and_skips_a_broken_version(two_versions):
    registry, v1, v2 = two_versions
    switched = []
    follower = ActiveVersionFollower(registry, registry.store.active().generation, v1, switched.append)
    asyncio.run(follower.check())
    assert switched == []  # nothing changed
    registry.promote(v2)
    asyncio.run(follower.check())
    assert [s.version for s in switched] == [v2] and follower.version == v2
    assert switched[0].generation == registry.store.active().generation
    registry.rollback()
    registry.promote(v2)  # v1 and back between two polls: same version, no reload
    asyncio.run(follower.check())
    assert len(switched) == 1 and follower.generation == registry.store.active().generation
    (Path(registry.store.version(v1).bundle) / "probe.npz").write_bytes(b"broken")
    registry.store.activate(v1)  # around the registry's own verification
    asyncio.run(follower.check())
    asyncio.run(follower.check())  # not retried until the generation moves again
    assert len(switched) == 1 and follower.version == v2
    assert list(follower.failed.values())[0].startswith(f"{v1}: ") and len(follower.failed) == 1


def test_progress_and_eta_from_the_revision_callback(two_versions):
    registry, v1, _ = two_versions
    registry.store.add_verdict(v1, verdict(1, "reject", 1, "ada"))
    registry.store.add_job(v1, RevisionSettings(mode="revise", rounds=2, epochs_per_round=2))
    job = registry.store.claim_job("w", 60)
    beat = Heartbeat(registry, job, registry.store.job_settings(job["id"]), "w", 60)
    assert (beat.progress["rounds"], beat.progress["epochs"]) == (2, 2)
    beat.log("round 1 epoch 1/2: {}")  # for people: the log tail, not the progress
    assert beat.progress["epoch"] == 0
    beat.record(ProgressEvent(1, 2, 1, 2, "training", eta_seconds(10.0, 1, 4)))  # ten seconds in
    assert (beat.progress["round"], beat.progress["epoch"], beat.progress["eta_seconds"]) == (1, 1, 30.0)
    beat.record(ProgressEvent(1, 2, 2, 2, "round done", eta_seconds(10.0, 2, 4)))
    assert beat.progress["eta_seconds"] == 10.0
    beat.stage("revising")
    stored = registry.store.job(job["id"])
    assert stored["progress"]["stage"] == "revising" and "round 1 epoch 1/2" in stored["log"]
    registry.store.claim_job("other", 60)  # nothing to take: still ours
    assert beat.lost is False


@pytest.mark.registry_engines("postgresql")
def test_a_listening_follower_sees_a_promote_long_before_its_poll(two_versions):
    """On PostgreSQL the promote's NOTIFY wakes the follower: switched in well under a 30 s poll."""
    registry, v1, v2 = two_versions

    async def promote_and_wait() -> float:
        switched = asyncio.Event()
        follower = ActiveVersionFollower(registry, registry.store.active().generation, v1,
                                         lambda served: switched.set(), poll_seconds=30)
        follower.start()
        try:
            await asyncio.sleep(0.2)  # its first wait begun (a promote before the LISTEN is caught on connect)
            await asyncio.to_thread(registry.store.activate, v2)
            committed = time.monotonic()
            await asyncio.wait_for(switched.wait(), 20)
            return time.monotonic() - committed
        finally:
            follower.close()

    seconds = asyncio.run(promote_and_wait())
    assert seconds < 5, seconds  # the load of the version included; the poll would have taken 30 s
