"""`protoserve score --engine local`: threads on this machine, each with its own ONNX Runtime session."""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from bundle.runtime import CUDA, classify, open_session, verify_bundle
from inference.model import classifier_graph
from protoserve.blas import one_blas_thread
from scoring.job import Job
from scoring.pictures import PictureWriter
from scoring.rows import Columns

# Scored chunks that may wait for the committer (their model outputs: about 0.5 MB each at the default
# chunk size; with --pictures, their model input too).
COMMIT_QUEUE = 16


def default_workers() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def session_threads(workers: int, cores: int | None = None) -> int:
    """Intra-op threads of each of `workers` sessions: the cores shared out, less the one the rest of
    the job (reading, conversion, rows, commits) keeps busy once the sessions leave it free; at least 1.
    A single session on 2 cores thus has one core to itself, the pipeline the other."""
    cores = cores or default_workers()
    return max(1, (cores - 1) // workers)


def open_sessions(job: Job) -> tuple[list, object]:
    """One session per worker thread (one in all on a GPU unless --workers says otherwise), after the
    golden probe passed, on the graph cut to what the rows read where that gives the same numbers
    (inference.model.classifier_graph), and the session on the whole graph (for --pictures, which read
    every output). They are opened here, not inside the threads: opening one sets
    ONNX Runtime's process-wide log level for a moment (export/runtime.open_session)."""
    workers = job.spec.workers or default_workers()
    threads = session_threads(workers)
    verify_bundle(job.bundle, job.spec.device)
    first, provider = open_session(job.bundle.model_path, job.spec.device, threads=threads)
    if provider == CUDA and not job.spec.workers:
        workers = 1  # one session keeps a GPU busy; more would only take turns on it
    cut = classifier_graph(job.bundle, first, job.spec.device, threads)
    graph = job.bundle.model_path if cut is None else cut[0]
    whole, first = first, (first if cut is None else cut[1])
    return [first] + [open_session(graph, job.spec.device, threads=threads)[0] for _ in range(workers - 1)], whole


def run_local(job: Job, pending: list[int], advance) -> None:
    """Score the pending chunks with one thread per session; `advance(n)` after each commit.

    The main thread reads inputs (files are read in order, so gzip and npz members stream) and converts
    them to the model's input (pictures decoded, levels scaled); the worker threads only run their
    session; one thread shapes the rows, column by column, and one writes the committed chunks, so the
    sessions never wait on the rows or the disk, nor the rows on the disk; at most 2 x workers + 1
    chunks of inputs (and COMMIT_QUEUE of model outputs or rows) are in memory at once, whatever the
    input size.
    """
    one_blas_thread()  # the rows' numpy products would otherwise spin threads beside the sessions
    sessions, whole = open_sessions(job)
    workers = len(sessions)
    spec = job.spec
    pictures = None if spec.pictures is None else PictureWriter(job.bundle, spec.pictures, spec.pictures_for, whole,
                                                                 spec.top_k, spec.abstain)
    local = threading.local()

    def infer(x: np.ndarray):
        if not hasattr(local, "session"):
            local.session = sessions.pop()  # list.pop is atomic: each thread takes its own
        return classify(local.session, x, job.scorer.features)

    def score(k: int, start: int, ids, truth: np.ndarray, buffer: np.ndarray, x: np.ndarray, errors,
              flat: np.ndarray | None) -> Future:
        """Chunk k through a session, and nothing else: its rows and pictures go to the shaper thread."""
        try:
            outputs = job.scorer.run(x, errors, infer)
        except BaseException:
            buffers.put(buffer)
            raise
        if pictures is None:  # the model input is needed no more
            buffers.put(buffer)
            buffer = x = None
        return shaper.submit(shape_rows, k, start, ids, truth, buffer, x, outputs, flat)

    def read(k: int) -> tuple:
        """Chunk k read and converted to model input, here in the reading thread while the sessions run,
        into a buffer of the pool: chunks in flight never allocate (and fault in) memory anew."""
        start, ids, values = job.read_inputs(k)
        buffer = buffers.get()
        x, errors = job.scorer.prepare(values, buffer)
        return k, start, ids, job.truth(k), buffer, x, errors, job.scorer.flat(x)

    def shape_rows(k: int, start: int, ids, truth: np.ndarray, buffer: np.ndarray | None, x: np.ndarray | None,
                   outputs: tuple, flat: np.ndarray | None) -> Future:
        """Chunk k's rows, column by column, and its pictures (before the commit: a committed row's
        picture exists); then on to the committer."""
        try:
            columns = job.scorer.rows(start, ids, *outputs, flat=flat)
            columns.true_label = truth
            if pictures is not None:
                pictures.write(columns, x)
        finally:
            if buffer is not None:
                buffers.put(buffer)
        return committer.submit(commit, k, columns)

    def commit(k: int, columns: Columns) -> int:
        job.commit(k, columns)
        return len(columns)

    def collect(scoring_limit: int, commit_limit: int) -> None:
        """Wait until fewer than `scoring_limit` chunks are being scored and fewer than `commit_limit` wait
        for their commit; count committed ones. Commits have their own limit: a slow disk (fsync) holds
        back the reading only once many chunks wait for it, never the sessions at once."""
        while len(scoring) >= scoring_limit or len(committing) >= commit_limit:
            done, _ = wait(scoring | committing, return_when=FIRST_COMPLETED)
            for future in done:
                if future in scoring:
                    scoring.discard(future)
                    committing.add(future.result())  # scored; now being shaped, then committed
                    continue
                committing.discard(future)
                result = future.result()
                if isinstance(result, Future):  # shaped; now being committed
                    committing.add(result)
                else:
                    advance(result)

    job.assemble_while_scoring(pending)  # commits come from the one committer thread below
    scoring: set[Future] = set()
    committing: set[Future] = set()
    spec_in = job.scorer.spec
    shape = (min(job.spec.chunk_size, max(job.n, 1)), spec_in.channels, spec_in.height, spec_in.width)
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(2 * workers + 1):  # one per chunk being scored (collect's scoring limit)
        buffers.put(np.empty(shape, np.float32))
    with ThreadPoolExecutor(workers, thread_name_prefix="protoserve-score") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="protoserve-rows") as shaper, \
            ThreadPoolExecutor(1, thread_name_prefix="protoserve-commit") as committer:
        for k in pending:
            scoring.add(pool.submit(score, *read(k)))
            collect(2 * workers + 1, COMMIT_QUEUE)
        collect(1, 1)
