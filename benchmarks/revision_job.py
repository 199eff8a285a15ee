"""How long a revision job of the shipped ProtoPNet takes through `protoserve worker`, and what it costs.

    python benchmarks/revision_job.py [--data-root DIR] [--reject 6 0] [--modes mask revise] [--keep]
    python benchmarks/revision_job.py --modes revise --rounds 3 --train-encoder --all-rounds

A throw-away registry in a temporary folder gets the shipped bundle and checkpoint
(models/protopnet_mnist, read only) as its active version, as `make review` does. Then, per mode
(`mask`, then `revise`): two reject verdicts on the given prototypes (#6 stands for class 1 while its
nearest training images are 3s and a 5; #0 sits off the digit), a job with the options the review page
sends (one round, one epoch, encoder frozen; --rounds, --epochs-per-round, --train-encoder,
--all-rounds and --train-subset change them), and `protoserve worker --once` as its own process, which
revises, exports with the parity check on the test set, registers the candidate and computes its
nearest training images. Prints per job: seconds from job start (the worker's claim) to the candidate
registered and to the job done, from the registry's own records; the worker process's wall time
(interpreter and imports included) and peak RSS; parent and candidate test accuracy; the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protoserve.settings import settings  # noqa: E402
from registry.revision_settings import RevisionSettings  # noqa: E402
from registry.verdicts import verdict  # noqa: E402
from registry.versions import Registry  # noqa: E402

SHIPPED = REPO / "models" / "protopnet_mnist"
PAGE_OPTIONS = {"rounds": 1, "epochs_per_round": 1, "freeze_encoder": True, "auto_promote": False,
                "max_accuracy_drop": 0.01}  # what the review page posts with its own defaults


def shipped_registry(root: Path) -> tuple[Registry, str]:
    """A registry whose active version is the shipped ProtoPNet (copied in with its checkpoint)."""
    registry = Registry(root)
    row = registry.register(SHIPPED / "bundle", SHIPPED / "checkpoint.pt")
    registry.promote(row.version, actor="benchmark")
    return registry, row.version


def run_worker(registry: Registry, data_root: str | None, log: Path) -> tuple[float, float]:
    """`protoserve worker --once` in its own process: (wall seconds, peak RSS in MiB) of that process."""
    cmd = [sys.executable, "-m", "cli.main", "worker", "--registry", str(registry.root), "--once"]
    if data_root:
        cmd += ["--data-root", data_root]
    started = time.monotonic()
    with open(log, "ab") as out:
        worker = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                  stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(worker.pid, 0)  # this child's own rusage, not the sum over all children
    worker.returncode = os.waitstatus_to_exitcode(status)
    if worker.returncode:
        sys.exit(f"protoserve worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - started, usage.ru_maxrss / 1024


def job_figures(registry: Registry, job_id: int) -> dict:
    """Seconds from the job's start to its candidate registered and to done, from the registry's records:
    the start is when the job finished less the elapsed time its last heartbeat recorded."""
    job = registry.store.job(job_id)
    if job["status"] != "done":
        sys.exit(f"job {job_id} {job['status']}: {job['error']}\n{job['log'][-3000:]}")
    finished = datetime.fromisoformat(job["finished_at"])
    started = finished.timestamp() - job["progress"]["elapsed_seconds"]
    candidate = registry.store.version(job["result"]["candidate"])
    return {"version": candidate.version,
            "registered": datetime.fromisoformat(candidate.created_at).timestamp() - started,
            "done": finished.timestamp() - started, **job["result"]["test_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=settings().data_root, help="MNIST IDX files")
    p.add_argument("--reject", type=int, nargs=2, default=[6, 0], metavar="ID", help="the two prototypes rejected")
    p.add_argument("--modes", nargs="+", default=["mask", "revise"], choices=["mask", "revise"])
    p.add_argument("--rounds", type=int, default=PAGE_OPTIONS["rounds"], help="revision rounds (mode revise)")
    p.add_argument("--epochs-per-round", type=int, default=PAGE_OPTIONS["epochs_per_round"])
    p.add_argument("--train-encoder", action="store_true", help="train the encoder too (the page's default freezes it)")
    p.add_argument("--all-rounds", action="store_true", help="train every round, also after one that rejects nothing")
    p.add_argument("--train-subset", type=int, default=None, help="revise on the first N training images only")
    p.add_argument("--keep", action="store_true", help="keep the temporary registry and the worker log")
    args = p.parse_args()
    options = {**PAGE_OPTIONS, "rounds": args.rounds, "epochs_per_round": args.epochs_per_round,
               "freeze_encoder": not args.train_encoder, "all_rounds": args.all_rounds,
               "train_subset": args.train_subset}

    work = Path(tempfile.mkdtemp(prefix="revision_job_"))
    registry, parent = shipped_registry(work / "registry")
    print(f"registry {registry.root}: {parent} active; load average {os.getloadavg()[0]:.2f}")
    rows = []
    try:
        for mode in args.modes:
            for j in args.reject:
                registry.store.add_verdict(parent, verdict(j, "reject", 1, "benchmark", note="revision_job.py"))
            job = registry.store.add_job(parent, RevisionSettings(mode=mode, **options))
            print(f"job {job['id']} ({mode}, rejecting {args.reject}, {options}): running protoserve worker --once ...")
            wall, rss = run_worker(registry, args.data_root, work / "worker.log")
            rows.append({"mode": mode, "wall": wall, "rss": rss, **job_figures(registry, job["id"])})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'mode':8} {'start->registered':>18} {'start->done':>12} {'worker wall':>12} {'peak RSS':>10}"
          f"  test accuracy parent -> candidate")
    for r in rows:
        print(f"{r['mode']:8} {r['registered']:17.1f}s {r['done']:11.1f}s {r['wall']:11.1f}s {r['rss']:7.0f} MiB"
              f"  {r['parent']:.2%} -> {r['candidate']:.2%} ({r['version']})")
    print(f"load average (1, 5, 15 min) after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          + (f"; kept {work}" if args.keep else ""))


if __name__ == "__main__":
    main()
