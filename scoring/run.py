"""`protoserve score`: run a job (scoring/job.py) on an engine, with a progress bar and a summary line."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scoring.job import Job, JobError, JobSpec, job_lock, staging
from scoring.local_engine import run_local
from scoring.ray_engine import run_ray

ENGINES = ("local", "ray")


@dataclass
class Summary:
    """What a run did: the summary line `protoserve score` prints."""
    images: int  # rows in the output
    failed: int  # rows with an error
    scored_now: int  # rows scored by this run (the rest came from an earlier, interrupted run)
    seconds: float  # wall time of this run
    output: Path | str  # the --output: a path or an s3:// URL
    already_complete: bool = False
    nodes: dict[str, int] = field(default_factory=dict)  # --engine ray: Ray node id -> images it scored now

    @property
    def rate(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"{self.output}: already complete ({self.images} images, {self.failed} failed); nothing to do"
        on = f" on {len(self.nodes)} Ray node{'s' if len(self.nodes) != 1 else ''}" if self.nodes else ""
        return (f"{self.images} images in {self.output} ({self.failed} failed); scored {self.scored_now} in "
                f"{self.seconds:.1f} s wall time, {self.rate:.0f} images/s{on}")


def run_scoring_job(spec: JobSpec, engine: str = "local", restart: bool = False, progress: bool = True,
            ray_address: str | None = None) -> Summary:
    """Score every input of `spec` into its output; resumes a killed job with the same arguments."""
    started = time.perf_counter()
    if engine not in ENGINES:
        raise JobError(f"engine {engine!r}: expected {' or '.join(ENGINES)}")
    with job_lock(staging(spec.output)):
        return _run_locked(spec, engine, restart, progress, ray_address, started)


def _run_locked(spec: JobSpec, engine: str, restart: bool, progress: bool, ray_address: str | None,
                started: float) -> Summary:
    job = Job(spec)
    if job.start(restart):
        images, failed = job.totals()
        return Summary(images, failed, 0, time.perf_counter() - started, job.name, already_complete=True)
    pending = job.pending()
    done_before = job.n - sum(job.chunk_range(k)[1] - job.chunk_range(k)[0] for k in pending)
    bar = _progress_bar(job.n, done_before, progress)
    nodes: dict[str, int] = {}
    try:
        if engine == "ray":
            nodes = run_ray(job, pending, bar.update, address=ray_address)
        else:
            run_local(job, pending, bar.update)
    except BaseException:
        if job.assembly is not None:
            job.assembly.abort()  # its chunks are committed; the next run writes the output again
        raise
    finally:
        bar.close()
        job.inputs.close()
    images, failed = job.finish()
    return Summary(images, failed, job.n - done_before, time.perf_counter() - started, job.name, nodes=nodes)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, smoothing=0.1, mininterval=0.5,
                file=sys.stderr, disable=not enabled, desc="scoring")
