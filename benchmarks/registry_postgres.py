"""The registry on SQLite and on PostgreSQL: how fast workers claim jobs, and how soon a promote reaches a
follower.

    python benchmarks/registry_postgres.py --bundle models/prototypedl_mnist/bundle

Starts its own PostgreSQL server (registry/local_postgres.py: initdb in a temporary folder, durable:
fsync on, as a deployment's server) and a SQLite registry file beside it, and measures on each:

- claim throughput: JOBS queued jobs, then 1, 4 and 8 worker processes each claiming a job and finishing
  it (claim_job + finish_job, two write transactions) until none is left; jobs per second, and a check
  that no job was claimed twice.
- promote to follower: SWITCHES promotes alternating between two versions of the bundle, each measured
  from the promote call (the store's activate: its transaction, commit included) to the moment a
  follower (service/served_version.py ActiveVersionFollower, in this process, poll interval POLL) has
  loaded the new version (checksums, probe, warm-up) and switched; on PostgreSQL the follower LISTENs
  for the promote's NOTIFY, on SQLite it polls. Also the bare notification delay on PostgreSQL (promote
  call to the listener's callback, no version loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.manifest import read_bundle, write_manifest  # noqa: E402
from registry.local_postgres import LocalPostgres  # noqa: E402
from registry.revision_settings import RevisionSettings  # noqa: E402
from registry.store import Store  # noqa: E402
from registry.versions import Registry  # noqa: E402
from service.served_version import ActiveVersionFollower  # noqa: E402


def claim_until_empty(url: str, name: str, claimed) -> None:
    store = Store(url)
    while (job := store.claim_job(name, lease_seconds=60)) is not None:
        store.finish_job(job["id"], name, result={"ok": True})
        claimed.append(job["id"])


def claim_throughput(url: str, jobs: int, workers: int) -> dict:
    store = Store(url)
    if not any(r.version == "bench" for r in store.versions()):
        store.add_version("bench", "bench", "prototypedl", "/nowhere", None, None, "registered")
    for _ in range(jobs):
        store.add_job("bench", RevisionSettings(mode="prune"))
    with multiprocessing.Manager() as manager:
        claimed = manager.list()
        processes = [multiprocessing.Process(target=claim_until_empty, args=(url, f"w{i}", claimed))
                     for i in range(workers)]
        started = time.perf_counter()
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        seconds = time.perf_counter() - started
        ids = list(claimed)
    assert len(ids) == len(set(ids)) == jobs, f"{len(ids)} claims of {jobs} jobs, {len(set(ids))} distinct"
    return {"workers": workers, "jobs": jobs, "seconds": round(seconds, 3), "jobs_per_s": round(jobs / seconds, 1)}


def two_versions(bundle: Path, root: Path, db: str | None) -> tuple[Registry, str, str]:
    registry = Registry(root, db)
    registry.register(bundle)
    copy = Path(shutil.copytree(bundle, root.parent / f"{root.name}-copy"))
    manifest = read_bundle(copy).manifest
    write_manifest(copy, manifest.model_copy(update={"version": f"{manifest.version}-b"}))
    registry.register(copy)
    registry.promote(manifest.version)
    return registry, manifest.version, f"{manifest.version}-b"


async def follow_switches(registry: Registry, a: str, b: str, switches: int, poll: float) -> list[float]:
    """Seconds from each promote call (its transaction and commit inside) to the follower's switch."""
    switched: asyncio.Queue = asyncio.Queue()
    follower = ActiveVersionFollower(registry, registry.store.active().generation, a,
                                     lambda served: switched.put_nowait(time.monotonic()), poll_seconds=poll)
    follower.start()
    await asyncio.sleep(0.5)
    delays = []
    try:
        for i in range(switches):
            called = time.monotonic()
            await asyncio.to_thread(registry.store.activate, b if i % 2 == 0 else a)
            delays.append(await asyncio.wait_for(switched.get(), 30) - called)
            await asyncio.sleep(0.3 + 0.1 * (i % 5))  # promotes at varying offsets from the poll's phase
    finally:
        follower.close()
    return delays


def notification_delays(registry: Registry, a: str, b: str, switches: int) -> list[float]:
    heard, stop = [], threading.Event()
    got = threading.Event()

    def on_switch(generation: str) -> None:
        if generation:
            heard.append(time.monotonic())
            got.set()

    listener = threading.Thread(target=registry.store.listen_for_switches, args=(on_switch, stop), daemon=True)
    listener.start()
    time.sleep(0.5)
    delays = []
    for _ in range(switches):
        got.clear()
        target = b if registry.store.active().version == a else a
        called = time.monotonic()
        registry.store.activate(target)
        assert got.wait(10)
        delays.append(heard[-1] - called)
    stop.set()
    listener.join()
    return delays


def summary(delays: list[float]) -> str:
    ms = sorted(1000 * d for d in delays)
    return (f"median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, "
            f"max {ms[-1]:.1f} ms (n={len(ms)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models" / "prototypedl_mnist" / "bundle"))
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--poll", type=float, default=0.5, help="the follower's poll interval (the default setting)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="registry_postgres_"))
    with LocalPostgres(durable=True) as server:
        engines = {"sqlite": None, "postgresql": server.create_database("bench")}
        for engine, url in engines.items():
            jobs_url = url or f"sqlite:///{work / 'jobs.sqlite'}"
            for workers in args.workers:
                r = claim_throughput(jobs_url, args.jobs, workers)
                print(f"{engine:10s} claim+finish: {r['workers']} workers, {r['jobs']} jobs in {r['seconds']:.2f} s: "
                      f"{r['jobs_per_s']:.0f} jobs/s, none claimed twice", flush=True)
        for engine, url in engines.items():
            registry, a, b = two_versions(Path(args.bundle), work / f"registry-{engine}", url)
            delays = asyncio.run(follow_switches(registry, a, b, args.switches, args.poll))
            how = "LISTEN/NOTIFY + poll" if registry.store.pushes_switches else "poll"
            print(f"{engine:10s} promote -> follower switched ({how}, poll {args.poll} s): {summary(delays)}",
                  flush=True)
            if registry.store.pushes_switches:
                print(f"{engine:10s} promote -> NOTIFY heard (no load): "
                      f"{summary(notification_delays(registry, a, b, args.switches))}", flush=True)
            registry.store.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
