"""A batch scoring job (`protoserve score`): chunks scored in parallel, committed atomically, resumable.

A job writes into `<output>.job/` beside the output:
    job.json           the plan: model digest, input fingerprint, top_k, chunk size, item count
                       (written once, atomically; a later run with other inputs or model is refused)
    chunk-000123.arrow the rows of items [123 * chunk_size, 124 * chunk_size) (Arrow IPC: cheap to
                       write and to read back): written to a temporary name, fsynced, then renamed,
                       so a chunk file that exists is complete
    complete.json      written after the output: the job's totals
    output.tmp<pid>    the output being written (removed by the next run if this one was killed)
and `<output>.lock` beside it, held (flock) while a run is going: a second run is refused.
The output is assembled from the chunk files in chunk order, into a temporary file renamed into
place at the end (Parquet: while the chunks commit, each as soon as those before it are in), so a
reader never sees a partial output. A run killed at any moment, SIGKILL
included, loses at most the chunks in flight; the next run with the same arguments scores only
the missing chunks, and every input appears exactly once in the output.

Engines: "local" (threads, each with its own ONNX Runtime session) and "ray" (scoring/ray_engine.py).
Both call BatchScorer.score on the same chunks and commit through the same Job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.bundle import Bundle, BundleError, read_bundle
from protoserve.errors import ProtoserveError
from scoring.inputs import Inputs, open_inputs
from scoring.rows import BatchScorer, Columns

# Inputs per committed chunk: ~0.4 s of one core for MNIST. Against 1,024 it cut the job's CPU per
# image by 6% (fewer commits, thread hand-offs and row groups; benchmarks/score.py, README), for at
# most one chunk per worker redone after a kill and a few more MB in flight.
CHUNK_SIZE = 4096
PARQUET_GROUP_CHUNKS = 4  # chunks per row group of the Parquet output (16,384 rows by default)
PLAN_VERSION = 3  # 2: rows gained prototype_similarities and prototype_contributions; 3: in_domain, typicality
JOB_FILE, DONE_FILE = "job.json", "complete.json"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CHUNK_METADATA = b"protoserve.chunk"


class JobError(ProtoserveError):
    """A job that cannot start or go on: changed input or model, an output that is not ours."""


@dataclass
class JobSpec:
    model: str  # a bundle directory or a BentoML store tag
    inputs: list[str]
    output: Path
    top_k: int = 3
    chunk_size: int = CHUNK_SIZE
    workers: int = 0  # 0: one ONNX Runtime session per core
    device: str = "auto"
    image_column: str | None = None


@dataclass
class Summary:
    images: int  # rows in the output
    failed: int  # rows with an error
    scored_now: int  # rows scored by this run (the rest came from an earlier, interrupted run)
    seconds: float  # wall time of this run
    output: Path
    already_complete: bool = False

    @property
    def rate(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"{self.output}: already complete ({self.images} images, {self.failed} failed); nothing to do"
        return (f"{self.images} images in {self.output} ({self.failed} failed); scored {self.scored_now} in "
                f"{self.seconds:.1f} s wall time, {self.rate:.0f} images/s")


def resolve_bundle(model: str) -> Bundle:
    """--model: a bundle directory if one exists at that path, else a tag in the BentoML model store."""
    if Path(model).is_dir():
        return read_bundle(model)
    if "/" in model or model.startswith("."):
        raise BundleError(f"{model}: no such bundle directory")
    from export.store import load_stored_bundle

    return load_stored_bundle(model)


def output_format(output: Path) -> str:
    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise JobError(f"{output}: output must end in .parquet or .jsonl")
    return fmt


class Job:
    """The plan and the on-disk state of one job; engines call read_chunk, commit and finish."""

    def __init__(self, spec: JobSpec, bundle: Bundle | None = None):
        self.spec = spec
        self.output = Path(spec.output)
        self.format = output_format(self.output)
        if spec.chunk_size < 1:
            raise JobError(f"chunk size {spec.chunk_size}: must be at least 1")
        self.bundle = bundle or resolve_bundle(spec.model)
        self.scorer = BatchScorer(self.bundle.manifest, spec.top_k)
        self.dir = self.output.with_name(self.output.name + ".job")
        self.inputs: Inputs = open_inputs(spec.inputs, spec.image_column,
                                          exclude=(self.dir, self.output, lock_path(self.output)))
        self.n = self.inputs.n
        self.chunks = -(-self.n // spec.chunk_size)
        m = self.bundle.manifest
        self.plan = {"plan_version": PLAN_VERSION, "model": {"tag": m.tag, "manifest_sha256": m.manifest_sha256},
                     "inputs": {"names": list(spec.inputs), "items": self.n,
                                "fingerprint": self.inputs.fingerprint(), "image_column": spec.image_column},
                     "top_k": spec.top_k, "chunk_size": spec.chunk_size, "chunks": self.chunks}
        self.assembly: ParquetAssembly | None = None  # the output, written while the chunks commit

    # -- state on disk --------------------------------------------------------------------------
    def start(self, restart: bool = False) -> bool:
        """Check or write the plan; True if the job is already complete (output in place)."""
        if restart:
            self._remove_all()
        saved = _read_json(self.dir / JOB_FILE)
        if saved is None:
            if self.output.exists():
                raise JobError(f"{self.output}: exists and is not the output of this job; pass --restart to "
                               "replace it, or choose another --output")
            if self.dir.exists():
                self._remove_all()  # a job directory without a plan: killed before the plan was written
            self.dir.mkdir(parents=True)
            atomic_write_text(self.dir / JOB_FILE, json.dumps(self.plan, indent=2) + "\n")
            return False
        changed = _what_changed(saved, self.plan)
        if changed:
            raise JobError(f"{self.output}: {changed} since this job started ({self.dir / JOB_FILE}); "
                           "pass --restart to score from scratch")
        for leftover in self.dir.glob("*.tmp*"):
            leftover.unlink()  # partial files of a run that was killed; never results
        if (self.dir / DONE_FILE).exists() and self.output.exists():
            for leftover in self.dir.glob("chunk-*.arrow"):
                leftover.unlink()  # killed while dropping the chunks of a finished job
            return True
        return False

    def chunk_path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.arrow"

    def chunk_range(self, k: int) -> tuple[int, int]:
        lo = k * self.spec.chunk_size
        return lo, min(self.n, lo + self.spec.chunk_size)

    def pending(self) -> list[int]:
        """Chunks without a complete file; a chunk file of the wrong length is removed and redone."""
        todo = []
        for k in range(self.chunks):
            rows = self.committed_rows(k)
            lo, hi = self.chunk_range(k)
            if rows != hi - lo:
                self.chunk_path(k).unlink(missing_ok=True)
                todo.append(k)
        return todo

    def committed_rows(self, k: int) -> int | None:
        path = self.chunk_path(k)
        if not path.exists():
            return None
        try:
            return self.read_committed(k).num_rows
        except (OSError, ValueError):  # pyarrow raises ArrowInvalid (a ValueError) for a damaged file
            return None

    def read_committed(self, k: int):
        """Chunk k's rows (an Arrow table, memory-mapped)."""
        import pyarrow as pa

        with pa.memory_map(str(self.chunk_path(k))) as source:
            return pa.ipc.open_file(source).read_all()

    def read_chunk(self, k: int) -> tuple[int, list[str], list[object] | np.ndarray]:
        """(first item's ordinal, ids, values) of chunk k, ready for BatchScorer.score."""
        lo, hi = self.chunk_range(k)
        return (lo, *self.inputs.read_values(lo, hi))

    def commit(self, k: int, columns: Columns) -> None:
        self.commit_table(k, to_table(columns))
        if self.assembly is not None:
            self.assembly.add(k)

    def assemble_while_scoring(self, pending: list[int]) -> None:
        """Parquet output: append each chunk to the output's temporary file as soon as every chunk
        before it is committed (commit() calls must then come from one thread), so that finish() only
        closes the file. A kill leaves the temporary file, which the next run removes like any other."""
        if self.format == "parquet":
            self.assembly = ParquetAssembly(self, done=set(range(self.chunks)) - set(pending))

    def commit_table(self, k: int, table) -> None:
        """Write chunk k (an Arrow table of row_schema) atomically: a temporary file, fsync, rename."""
        import pyarrow as pa

        lo, hi = self.chunk_range(k)
        if table.num_rows != hi - lo:
            raise JobError(f"chunk {k}: {table.num_rows} rows scored for {hi - lo} inputs")
        failed = table.num_rows - table.column("error").null_count  # rows with an error message
        stats = json.dumps({"rows": table.num_rows, "failed": failed})
        table = table.replace_schema_metadata({CHUNK_METADATA: stats})
        tmp = self.chunk_path(k).with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            with pa.ipc.new_file(f, table.schema) as writer:
                writer.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.chunk_path(k))

    def failed_in_chunks(self) -> int:
        import pyarrow as pa

        total = 0
        for k in range(self.chunks):  # the counts commit_table wrote into each chunk's schema
            with pa.memory_map(str(self.chunk_path(k))) as source:
                meta = pa.ipc.open_file(source).schema.metadata or {}
            total += json.loads(meta.get(CHUNK_METADATA, b'{"failed": 0}'))["failed"]
        return total

    def finish(self) -> tuple[int, int]:
        """Assemble the output from every chunk (atomically), record completion, drop the chunks."""
        failed = self.failed_in_chunks()
        if self.format == "parquet":
            assembly, self.assembly = self.assembly, None
            if assembly is None or not assembly.complete():
                if assembly is not None:
                    assembly.abort()
                assembly = ParquetAssembly(self, done=set(range(self.chunks)))
            tmp = assembly.close()
        else:
            tmp = self.dir / f"output.tmp{os.getpid()}"
            self._assemble_jsonl(tmp)
        os.replace(tmp, self.output)
        _fsync_dir(self.output.parent)
        atomic_write_text(self.dir / DONE_FILE, json.dumps({"images": self.n, "failed": failed,
                                                           "finished_at": time.time()}) + "\n")
        for k in range(self.chunks):
            self.chunk_path(k).unlink(missing_ok=True)
        return self.n, failed

    def totals(self) -> tuple[int, int]:
        done = _read_json(self.dir / DONE_FILE) or {}
        return int(done.get("images", self.n)), int(done.get("failed", 0))

    def _assemble_jsonl(self, tmp: Path) -> None:
        with open(tmp, "w") as f:
            for k in range(self.chunks):
                for row in self.read_committed(k).to_pylist():
                    f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _remove_all(self) -> None:
        import shutil

        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.output.unlink(missing_ok=True)


def run_job(spec: JobSpec, engine: str = "local", restart: bool = False, progress: bool = True,
            ray_address: str | None = None) -> Summary:
    """Score every input of `spec` into its output; resumes a killed job with the same arguments."""
    started = time.perf_counter()
    with job_lock(Path(spec.output)):
        return _run_locked(spec, engine, restart, progress, ray_address, started)


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def job_lock(output: Path):
    """Hold `<output>.lock` (flock) for the whole run: a second `protoserve score` of the same output,
    which could otherwise commit over this one's chunks or remove them with --restart, is refused.
    The kernel drops the lock when the holder exits, SIGKILL included, so a killed job never blocks
    its own resumption. The empty lock file stays (removing it would race a waiting run)."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(f"{output}: another protoserve score is running this job (it holds {path}); "
                           "wait for it to finish or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_locked(spec: JobSpec, engine: str, restart: bool, progress: bool, ray_address: str | None,
                started: float) -> Summary:
    job = Job(spec)
    if job.start(restart):
        images, failed = job.totals()
        return Summary(images, failed, 0, time.perf_counter() - started, job.output, already_complete=True)
    pending = job.pending()
    done_before = job.n - sum(job.chunk_range(k)[1] - job.chunk_range(k)[0] for k in pending)
    bar = _progress_bar(job.n, done_before, progress)
    try:
        if engine == "local":
            run_local(job, pending, bar.update)
        elif engine == "ray":
            from scoring.ray_engine import run_ray

            run_ray(job, pending, bar.update, address=ray_address)
        else:
            raise JobError(f"engine {engine!r}: expected local or ray")
    except BaseException:
        if job.assembly is not None:
            job.assembly.abort()  # its chunks are committed; the next run writes the output again
        raise
    finally:
        bar.close()
        job.inputs.close()
    images, failed = job.finish()
    return Summary(images, failed, job.n - done_before, time.perf_counter() - started, job.output)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class ParquetAssembly:
    """The Parquet output, written in chunk order into `<job dir>/output.tmp<pid>` as chunks become
    available: row groups of up to PARQUET_GROUP_CHUNKS chunks. Dictionary encoding only for the
    repetitive strings and statistics only for the integer keys: pyarrow's defaults (both on every
    column) took 4x as long here on the float lists, for a larger file."""

    def __init__(self, job: Job, done: set[int]):
        import pyarrow.parquet as pq

        self.job, self.done, self.next, self.group = job, set(done), 0, []
        self.schema = row_schema(job.plan)
        self.tmp = job.dir / f"output.tmp{os.getpid()}"
        self.file = open(self.tmp, "wb")
        self.writer = pq.ParquetWriter(self.file, self.schema,
                                       use_dictionary=["class_name", "model_name", "model_version", "error"],
                                       write_statistics=["index", "label"])
        self._drain()

    def add(self, k: int) -> None:
        self.done.add(k)
        self._drain()

    def complete(self) -> bool:
        return self.next == self.job.chunks

    def close(self) -> Path:
        """Write what is left, close and fsync the file; returns its path (the caller renames it)."""
        self._write_group()
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.tmp

    def abort(self) -> None:
        self.writer.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def _drain(self) -> None:
        while self.next in self.done:  # chunks in order, each once: the prefix that is complete
            self.group.append(self.job.read_committed(self.next))
            self.next += 1
            if len(self.group) == PARQUET_GROUP_CHUNKS:
                self._write_group()

    def _write_group(self) -> None:
        import pyarrow as pa

        if self.group:
            self.writer.write_table(pa.concat_tables(self.group).replace_schema_metadata(self.schema.metadata))
            self.group = []


def run_local(job: Job, pending: list[int], advance) -> None:
    """Score the pending chunks with `workers` threads, each holding its own ONNX Runtime session.

    The main thread reads inputs (files are read in order, so gzip and npz members stream); one
    thread writes the committed chunks; at most 2 x workers + 1 chunks are in memory at once,
    whatever the input size.
    """
    from export.runtime import CUDA, open_session, run_probe

    workers = job.spec.workers or default_workers()
    threads = max(1, default_workers() // workers)  # intra-op threads per session: the cores, shared out
    probe = run_probe(job.bundle, job.spec.device)
    if not probe.passed:
        raise BundleError(f"{job.bundle.model_path}: golden probe failed: {probe.failures[0]}")
    # Sessions are opened here, one per worker thread, not inside the threads: opening one sets
    # ONNX Runtime's process-wide log level for a moment (export/runtime.py).
    first, provider = open_session(job.bundle.model_path, job.spec.device, threads=threads)
    if provider == CUDA and not job.spec.workers:
        workers = 1  # one session keeps a GPU busy; more would only take turns on it
    sessions = [first] + [open_session(job.bundle.model_path, job.spec.device, threads=threads)[0]
                          for _ in range(workers - 1)]
    local = threading.local()

    def infer(x: np.ndarray):
        if not hasattr(local, "session"):
            local.session = sessions.pop()  # list.pop is atomic: each thread takes its own
        p, d = local.session.run(["probabilities", "distances"], {"image": x})
        return p, d

    def score(k: int, start: int, ids: list[str], values) -> Future:
        # Writing and fsyncing a chunk happens on its own thread, so the sessions never wait on the disk.
        return committer.submit(commit, k, job.scorer.score(start, ids, values, infer))

    def commit(k: int, columns: Columns) -> int:
        job.commit(k, columns)
        return len(columns)

    def collect(limit: int) -> None:
        """Wait until fewer than `limit` chunks are being scored or committed; count committed ones."""
        while len(inflight) >= limit:
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in done:
                inflight.discard(future)
                result = future.result()
                if isinstance(result, Future):
                    inflight.add(result)  # scored; now being committed
                else:
                    advance(result)

    job.assemble_while_scoring(pending)  # commits come from the one committer thread below
    inflight: set[Future] = set()
    with ThreadPoolExecutor(workers, thread_name_prefix="protoserve-score") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="protoserve-commit") as committer:
        for k in pending:
            inflight.add(pool.submit(score, k, *job.read_chunk(k)))
            collect(2 * workers + 1)
        collect(1)


# -- rows as Arrow -----------------------------------------------------------------------------------
def row_schema(plan: dict | None = None):
    import pyarrow as pa

    metadata = {b"protoserve.job": json.dumps(plan).encode()} if plan else None
    return pa.schema([
        ("index", pa.int64()), ("input_id", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
        ("probabilities", pa.list_(pa.float32())), ("prototype_ids", pa.list_(pa.int32())),
        ("prototype_distances", pa.list_(pa.float32())), ("prototype_similarities", pa.list_(pa.float32())),
        ("prototype_contributions", pa.list_(pa.float32())), ("in_domain", pa.bool_()), ("typicality", pa.float32()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("error", pa.string()),
    ], metadata=metadata)


def to_table(c: Columns):
    """Columns -> an Arrow table of row_schema (null prediction fields where a row has an error)."""
    import pyarrow as pa

    n, ok = len(c), c.ok
    null = pa.array(~ok)

    def full(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros(n, dtype)
        out[ok] = values
        return out

    def lists(values: np.ndarray, value_type):
        width = values.shape[1] if values.ndim == 2 else 0
        offsets = np.concatenate([[0], np.cumsum(np.where(ok, width, 0))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), value_type), mask=null)

    labels = full(c.label, np.int32)
    names = pa.array(np.array(c.class_names, dtype=object)[labels], pa.string(), mask=~ok)
    columns = [pa.array(c.index, pa.int64()), pa.array(c.input_id, pa.string()),
               pa.array(labels, pa.int32(), mask=~ok), names,
               lists(c.probabilities, pa.float32()), lists(c.prototype_ids, pa.int32()),
               lists(c.prototype_distances, pa.float32()), lists(c.prototype_similarities, pa.float32()),
               lists(c.prototype_contributions, pa.float32()), *domain_columns(c, full),
               pa.repeat(pa.scalar(c.model_name), n),
               pa.repeat(pa.scalar(c.model_version), n), pa.array(c.error, pa.string())]
    return pa.Table.from_arrays(columns, schema=row_schema())


def domain_columns(c: Columns, full) -> list:
    """in_domain and typicality as Arrow columns: null on failed rows and without calibration."""
    import pyarrow as pa

    if c.in_domain is None:
        return [pa.nulls(len(c), pa.bool_()), pa.nulls(len(c), pa.float32())]
    return [pa.array(full(c.in_domain, bool), pa.bool_(), mask=~c.ok),
            pa.array(full(c.typicality, np.float32), pa.float32(), mask=~c.ok)]


# -- small file helpers -------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise JobError(f"{path}: unreadable job file ({e}); pass --restart to start over") from None


def _what_changed(saved: dict, plan: dict) -> str | None:
    if saved.get("plan_version") != plan["plan_version"]:
        return "the job format changed"
    if saved["model"] != plan["model"]:
        return f"the model changed (was {saved['model']['tag']}, now {plan['model']['tag']})"
    if saved["inputs"] != plan["inputs"]:
        return "the input changed (files added, removed or modified)"
    for key in ("top_k", "chunk_size"):
        if saved.get(key) != plan[key]:
            return f"{key} changed (was {saved.get(key)}, now {plan[key]})"
    return None


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, smoothing=0.1, mininterval=0.5,
                file=sys.stderr, disable=not enabled, desc="scoring")
