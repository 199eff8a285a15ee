"""The plan and the on-disk state of a batch scoring job (`protoserve score`): chunks committed
atomically, resumable after a kill.

A job writes into `<output>.job/` beside the output:
    job.json           the plan: model digest, input fingerprint, top_k, chunk size, item count
                       (written once, atomically; a later run with other inputs or model is refused)
    chunk-000123.arrow the rows of items [123 * chunk_size, 124 * chunk_size) (Arrow IPC: cheap to
                       write and to read back): written to a temporary name, fsynced, then renamed,
                       so a chunk file that exists is complete
    complete.json      written after the output: the job's totals
    output.tmp<pid>    the output being written (removed by the next run if this one was killed)
and `<output>.lock` beside it, held (flock) while a run is going: a second run is refused.
The output is assembled from the chunk files in chunk order (scoring/outputs.py), into a temporary
file renamed into place at the end (Parquet: while the chunks commit, each as soon as those before
it are in), so a reader never sees a partial output. A run killed at any moment, SIGKILL included,
loses at most the chunks in flight; the next run with the same arguments scores only the missing
chunks, and every input appears exactly once in the output.

An s3:// output keeps the same files in the bucket, under `<output key>.job/`, and the job works in a
staging folder on this machine (staging(): `<cache>/scoring/jobs/<sha256 of the URL>/`): the plan is
uploaded first, each chunk right after its local rename (committed once the object is in the bucket:
an S3 PUT is whole or absent), the output at the end, then complete.json, then the chunks are deleted.
start() makes the staging folder a copy of the bucket's state (committed chunks downloaded, staged ones
the bucket lacks dropped), so a re-run on any machine resumes from the bucket. The lock is this
machine's only.

The engines (scoring/local_engine.py, scoring/ray_engine.py) read chunks and commit rows through a
Job; scoring/run.py chooses the engine. Imports run one way: run -> engines -> job -> outputs, rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from bundle.manifest import Bundle, BundleError, read_bundle
from bundle.store import load_stored_bundle
from protoserve.errors import ProtoserveError
from protoserve.settings import settings
from scoring import outputs
from scoring.bucket import Bucket, ObjectUrl, is_remote
from scoring.inputs import Inputs, open_inputs
from scoring.outputs import ParquetAssembly, to_table, write_jsonl
from scoring.pictures import PICTURES_FOR
from scoring.rows import BatchScorer, Columns

# Inputs per committed chunk. Larger chunks mean fewer commits, thread hand-offs and row groups;
# smaller ones less work redone after a kill.
CHUNK_SIZE = 4096
# The row format's version; a job started under another version is refused.
PLAN_VERSION = 4
JOB_FILE, DONE_FILE = "job.json", "complete.json"
CHUNK_METADATA = b"protoserve.chunk"
DROP_THREADS = 8  # chunk files removed at once when a job finishes


class JobError(ProtoserveError):
    """A job that cannot start or go on: changed input or model, an output that is not ours."""


@dataclass
class JobSpec:
    """What `protoserve score` was asked: the model, the inputs, the output and how to run."""
    model: str  # a bundle directory or a BentoML store tag
    inputs: list[str]  # paths or s3:// URLs
    output: Path | str  # a path, or an s3://bucket/key URL (a str: a Path would fold its "//")
    top_k: int = 3
    chunk_size: int = CHUNK_SIZE
    workers: int = 0  # 0: one ONNX Runtime session per core
    device: str = "auto"
    image_column: str | None = None
    canonicalize: bool = False  # /explain's "canonicalize": photo-like pictures made like the training images
    abstain: bool = False  # /explain's "abstain": out-of-domain rows withhold their label
    pictures: Path | None = None  # a folder for the explanation pictures of the rows `pictures_for` names
    pictures_for: str = "errors"  # errors | out-of-domain | all (scoring/pictures.py)


def resolve_bundle(model: str) -> Bundle:
    """--model: a bundle directory if one exists at that path, else a tag in the BentoML model store."""
    if Path(model).is_dir():
        return read_bundle(model)
    if "/" in model or model.startswith("."):
        raise BundleError(f"{model}: no such bundle directory")
    return load_stored_bundle(model)


def staging(output: Path | str) -> Path:
    """Where a job keeps its state on this machine: beside a local output, the output itself; for an s3://
    output, a folder of the cache named by the URL (`<cache>/scoring/jobs/<sha256 of the URL>/<name>`)."""
    if not is_remote(str(output)):
        return Path(output)
    url = ObjectUrl.parse(str(output))
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:32]
    return settings().cache_dir / "scoring" / "jobs" / digest / PurePosixPath(url.key).name


def output_format(output: Path | str) -> str:
    """"parquet" or "jsonl"; JobError for any other suffix."""
    fmt = outputs.output_format(output)
    if fmt is None:
        raise JobError(f"{output}: output must end in .parquet or .jsonl")
    return fmt


class Job:
    """The plan and the on-disk state of one job; engines call read_inputs, commit and finish."""

    def __init__(self, spec: JobSpec, bundle: Bundle | None = None):
        self.spec = spec
        self.name = str(spec.output)  # what messages call the output
        self.remote = ObjectUrl.parse(self.name) if is_remote(self.name) else None
        if self.remote is not None and not self.remote.key:
            raise JobError(f"{self.name}: name the output object (s3://bucket/prefix/scores.parquet)")
        self.format = output_format(self.name)
        self.output = staging(spec.output)  # the output file on this machine (s3://: uploaded at the end)
        if spec.chunk_size < 1:
            raise JobError(f"chunk size {spec.chunk_size}: must be at least 1")
        if spec.pictures_for not in PICTURES_FOR:
            raise JobError(f"pictures for {spec.pictures_for!r}: expected {' or '.join(PICTURES_FOR)}")
        self.bundle = bundle or resolve_bundle(spec.model)
        self.scorer = BatchScorer(self.bundle.manifest, spec.top_k, canonical=spec.canonicalize, abstain=spec.abstain)
        self.dir = self.output.with_name(self.output.name + ".job")
        self.inputs: Inputs = open_inputs(spec.inputs, spec.image_column,
                                          exclude=(self.dir, self.output, lock_path(self.output), self.name))
        self.n = self.inputs.n
        self.chunks = -(-self.n // spec.chunk_size)
        m = self.bundle.manifest
        self.plan = {"plan_version": PLAN_VERSION, "model": {"tag": m.tag, "manifest_sha256": m.manifest_sha256},
                     "inputs": {"names": list(spec.inputs), "items": self.n,
                                "fingerprint": self.inputs.fingerprint(), "image_column": spec.image_column},
                     "top_k": spec.top_k, "chunk_size": spec.chunk_size, "chunks": self.chunks,
                     "canonicalize": spec.canonicalize, "abstain": spec.abstain,
                     "pictures": None if spec.pictures is None else str(Path(spec.pictures).resolve()),
                     "pictures_for": spec.pictures_for if spec.pictures is not None else None}
        self.assembly: ParquetAssembly | None = None  # the output, written while the chunks commit
        self.failed: dict[int, int] = {}  # chunk -> rows with an error, for the chunks this run committed

    # -- state on disk --------------------------------------------------------------------------
    def start(self, restart: bool = False) -> bool:
        """Check or write the plan; True if the job is already complete (output in place)."""
        if self.remote is not None:
            return self._start_remote(restart)
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
        """The committed rows of chunk k: `<job dir>/chunk-<k>.arrow`."""
        return self.dir / f"chunk-{k:06d}.arrow"

    def chunk_range(self, k: int) -> tuple[int, int]:
        """[lo, hi): the item ordinals of chunk k."""
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
        """Rows in chunk k's file, or None when there is no readable file."""
        path = self.chunk_path(k)
        if not path.exists():
            return None
        try:
            return self.read_rows(k).num_rows
        except (OSError, ValueError):  # pyarrow raises ArrowInvalid (a ValueError) for a damaged file
            return None

    def read_rows(self, k: int):
        """Chunk k's committed rows (an Arrow table, memory-mapped)."""
        import pyarrow as pa

        with pa.memory_map(str(self.chunk_path(k))) as source:
            return pa.ipc.open_file(source).read_all()

    def read_inputs(self, k: int) -> tuple[int, list[str], list[object] | np.ndarray]:
        """(first item's ordinal, ids, values) of chunk k, ready for BatchScorer.score."""
        lo, hi = self.chunk_range(k)
        return (lo, *self.inputs.read_values(lo, hi))

    def truth(self, k: int) -> np.ndarray:
        """int64: the classes of chunk k's inputs where the inputs say them, else -1 (the rows' true_label)."""
        return self.inputs.truth(*self.chunk_range(k), list(self.bundle.manifest.class_names))

    def commit(self, k: int, columns: Columns) -> None:
        """Commit chunk k's rows (atomically) and hand them to the Parquet assembly if one runs."""
        table = to_table(columns)
        self.commit_table(k, table)
        if self.assembly is not None:
            self.assembly.add(k, table)  # the rows in memory: the assembly need not read the file back

    def assemble_while_scoring(self, pending: list[int]) -> None:
        """Parquet output: append each chunk to the output's temporary file as soon as every chunk
        before it is committed (commit() calls must then come from one thread), so that finish() only
        closes the file. A kill leaves the temporary file, which the next run removes like any other."""
        if self.format == "parquet":
            self.assembly = self._parquet_assembly(done=set(range(self.chunks)) - set(pending))

    def commit_table(self, k: int, table) -> None:
        """Write chunk k (an Arrow table of row_schema) atomically: a temporary file, fsync, rename."""
        import pyarrow as pa

        lo, hi = self.chunk_range(k)
        if table.num_rows != hi - lo:
            raise JobError(f"chunk {k}: {table.num_rows} rows scored for {hi - lo} inputs")
        failed = table.num_rows - table.column("error").null_count  # rows with an error message
        self.failed[k] = failed
        stats = json.dumps({"rows": table.num_rows, "failed": failed})
        table = table.replace_schema_metadata({CHUNK_METADATA: stats})
        tmp = self.chunk_path(k).with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            with pa.ipc.new_file(f, table.schema) as writer:
                writer.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.chunk_path(k))
        if self.remote is not None:
            self.bucket.upload(self.chunk_path(k), self._key(self.chunk_path(k).name))  # now it is committed

    def failed_in_chunks(self) -> int:
        """Rows with an error over every committed chunk (counts stored in each chunk's metadata)."""
        import pyarrow as pa

        total = 0
        for k in range(self.chunks):  # the counts commit_table wrote into each chunk's schema
            if k in self.failed:  # committed by this run: counted then
                total += self.failed[k]
                continue
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
                assembly = self._parquet_assembly(done=set(range(self.chunks)))
            tmp = assembly.close()
        else:
            tmp = self.dir / f"output.tmp{os.getpid()}"
            write_jsonl(tmp, self.chunks, self.read_rows)
        os.replace(tmp, self.output)
        _fsync_dir(self.output.parent)
        if self.remote is not None:
            self.bucket.upload(self.output, self.remote.key)
        atomic_write_text(self.dir / DONE_FILE, json.dumps({"images": self.n, "failed": failed,
                                                           "finished_at": time.time()}) + "\n")
        if self.remote is not None:
            self.bucket.upload(self.dir / DONE_FILE, self._key(DONE_FILE))
            self.bucket.delete([self._key(self.chunk_path(k).name) for k in range(self.chunks)])
            self.output.unlink()  # the bucket holds it; this machine kept a copy only to send it
        self._drop_chunks()
        return self.n, failed

    def _drop_chunks(self) -> None:
        """Remove the chunk files of a finished job, several at once: removing a file that was fsynced
        waits on the file system's journal, and the waits overlap."""
        with ThreadPoolExecutor(DROP_THREADS) as pool:
            list(pool.map(lambda k: self.chunk_path(k).unlink(missing_ok=True), range(self.chunks)))

    def totals(self) -> tuple[int, int]:
        """(images, failed) of a finished job, from complete.json."""
        done = _read_json(self.dir / DONE_FILE) or {}
        return int(done.get("images", self.n)), int(done.get("failed", 0))

    def _parquet_assembly(self, done: set[int]) -> ParquetAssembly:
        return ParquetAssembly(self.dir / f"output.tmp{os.getpid()}", self.plan, self.chunks, self.read_rows,
                               done)

    def _remove_all(self) -> None:
        import shutil

        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.output.unlink(missing_ok=True)

    # -- state in an object store (an s3:// output) ---------------------------------------------------
    @functools.cached_property
    def bucket(self) -> Bucket:
        """The output's bucket (made on first use: a Ray actor's Job never touches it)."""
        return Bucket(self.remote.bucket, "--output")

    def _key(self, name: str) -> str:
        """The key of a file of the job directory: `<output key>.job/<name>`."""
        return f"{self.remote.key}.job/{name}"

    def _start_remote(self, restart: bool) -> bool:
        """start() for an s3:// output. The bucket holds the job's state, as a local job directory would
        (`<output>.job/job.json`, the committed chunks, `complete.json`); this machine's staging folder is
        made its copy: chunks the bucket lacks are dropped (killed before their upload: not committed),
        chunks it has are downloaded, so the local logic (pending, assembly) reads the bucket's truth."""
        prefix = self._key("")
        if restart:
            self.bucket.delete([o.key for o in self.bucket.list(prefix)] + [self.remote.key])
        self._remove_local_leftovers()
        listed = {o.key[len(prefix):]: o for o in self.bucket.list(prefix)}
        saved = self._remote_json(JOB_FILE) if JOB_FILE in listed else None
        if saved is None:
            if self.bucket.exists(self.remote.key):
                raise JobError(f"{self.name}: exists and is not the output of this job; pass --restart to "
                               "replace it, or choose another --output")
            if listed:  # killed between its first objects and its plan: nothing committed
                self.bucket.delete([o.key for o in listed.values()])
            self._remove_all()
            self.dir.mkdir(parents=True)
            atomic_write_text(self.dir / JOB_FILE, json.dumps(self.plan, indent=2) + "\n")
            self.bucket.upload(self.dir / JOB_FILE, self._key(JOB_FILE))
            return False
        changed = _what_changed(saved, self.plan)
        if changed:
            raise JobError(f"{self.name}: {changed} since this job started ({self._key(JOB_FILE)} in bucket "
                           f"{self.remote.bucket!r}); pass --restart to score from scratch")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / JOB_FILE, json.dumps(saved, indent=2) + "\n")
        chunks = {name: o for name, o in listed.items() if name.startswith("chunk-")}
        if DONE_FILE in listed and self.bucket.exists(self.remote.key):
            self.bucket.download(self._key(DONE_FILE), self.dir / DONE_FILE)
            if chunks:
                self.bucket.delete([o.key for o in chunks.values()])  # killed while dropping them
            return True
        (self.dir / DONE_FILE).unlink(missing_ok=True)
        for path in self.dir.glob("chunk-*.arrow"):
            if path.name not in chunks or path.stat().st_size != chunks[path.name].size:
                path.unlink()
        for name, o in chunks.items():
            if not (self.dir / name).exists():
                self.bucket.download(o.key, self.dir / name)
        return False

    def _remote_json(self, name: str) -> dict:
        try:
            return json.loads(self.bucket.read(self._key(name)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JobError(f"s3://{self.remote.bucket}/{self._key(name)}: unreadable job file ({e}); pass "
                           "--restart to start over") from None

    def _remove_local_leftovers(self) -> None:
        for leftover in self.dir.glob("*.tmp*"):
            leftover.unlink()
        self.output.unlink(missing_ok=True)


def lock_path(output: Path) -> Path:
    """`<output>.lock`, the file job_lock holds."""
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


# -- small file helpers -------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file and a rename."""
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
    for key in ("top_k", "chunk_size", "canonicalize", "abstain", "pictures", "pictures_for"):
        if saved.get(key) != plan[key]:
            return f"{key} changed (was {saved.get(key)}, now {plan[key]})"
    return None
