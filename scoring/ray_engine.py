"""`protoserve score --engine ray`: the same job on Ray Data, for more than one machine.

The dataset is the job's pending chunk numbers; `map_batches` sends them to an actor pool whose
actors each hold an ONNX Runtime session (one GPU per actor where the cluster has GPUs). An actor
reads its chunk's inputs itself and scores them with the same BatchScorer as the local engine; the
driver commits the rows it gets back through the same Job, so the chunk files, resume, refusal of
changed inputs and the assembled output are exactly those of the local engine. Each chunk's rows come
back with the id of the Ray node that scored them; the run returns how many images each node scored.

On a cluster, every node must see the bundle and the inputs at the same paths (a shared or network
filesystem; s3:// inputs instead: every node reads them with its own S3 settings) and have protoserve
installed; the output and its chunks are written by the driver only (an s3:// output: uploaded by it).
Which cluster: `--ray-address` (e.g. ray://head:10001 or auto), else $RAY_ADDRESS, else a local Ray
started for the job. A Ray already initialised in the process (a test, a notebook) is used as it is.

Exactly once on a cluster: a chunk is committed by the driver only when all its rows have arrived, to a
file renamed into place, and the output is assembled from the chunk files in order. A node lost mid-job
loses only the chunks in flight on it: Ray Data retries them on the actors left, or the run fails and
the same command run again scores only the chunks without a file.
"""

from __future__ import annotations

import os

from bundle.manifest import read_bundle
from bundle.runtime import classify, open_session
from inference.model import classifier_graph
from protoserve.blas import one_blas_thread
from scoring.job import Job, JobError, JobSpec
from scoring.outputs import to_table


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks pandas/pyarrow pieces)
    except ImportError:
        raise JobError("--engine ray needs Ray Data: pip install 'protoserve[batch]' (ray[data])") from None
    return ray


class ChunkScorer:
    """A Ray Data actor: one ONNX Runtime session; a batch of chunk numbers -> their rows (Arrow)."""

    def __init__(self, bundle_path: str, spec: dict, plan: dict, use_gpu: bool, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative --input paths mean what they meant to the driver
        self.node = _import_ray().get_runtime_context().get_node_id()  # the node this actor runs on
        self.job = Job(JobSpec(**spec), bundle=read_bundle(bundle_path))
        for part in ("model", "inputs"):
            if self.job.plan[part] != plan[part]:
                raise JobError(f"Ray worker on {os.uname().nodename}: its view of the {part} differs from the "
                               "driver's (every node must see the same bundle and inputs at the same paths)")
        device = "cuda" if use_gpu else "cpu"
        one_blas_thread()  # one session per actor: the rows' numpy products stay on its thread
        self.session = open_session(self.job.bundle.model_path, device, threads=1)[0]
        cut = classifier_graph(self.job.bundle, self.session, device)  # the graph without what rows never read
        if cut is not None:
            self.session = cut[1]

    def __call__(self, batch: dict) -> object:
        import pyarrow as pa

        tables = []
        features = self.job.scorer.features
        for k in batch["chunk"]:
            start, ids, values = self.job.read_inputs(int(k))
            columns = self.job.scorer.score(start, ids, values, lambda x: classify(self.session, x, features))
            columns.true_label = self.job.truth(int(k))
            table = to_table(columns)
            table = table.add_column(0, "chunk", pa.array([int(k)] * table.num_rows, pa.int64()))
            tables.append(table.add_column(1, "node", pa.array([self.node] * table.num_rows, pa.string())))
        return pa.concat_tables(tables)


def run_ray(job: Job, pending: list[int], advance, address: str | None = None) -> dict[str, int]:
    """Score the pending chunks on Ray Data; the driver commits each chunk as its rows arrive.
    Returns the images each Ray node scored (node id -> images)."""
    import dataclasses

    if job.spec.pictures is not None:
        raise JobError("--pictures is written by the local engine only; run it with --engine local")
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return _run(ray, job, pending, advance, dataclasses.asdict(job.spec)) if pending else {}
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, job: Job, pending: list[int], advance, spec: dict) -> dict[str, int]:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job has its own progress bar
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = job.spec.workers or (gpus or max(1, int(resources.get("CPU", 1))))
    spec = {**spec, "output": str(spec["output"])}
    chunks = ray.data.from_items([{"chunk": k} for k in pending], override_num_blocks=len(pending))
    scored = chunks.map_batches(
        ChunkScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={"bundle_path": str(job.bundle.path.resolve()), "spec": spec, "plan": job.plan,
                               "use_gpu": bool(gpus), "cwd": os.getcwd()})
    parts: dict[int, list] = {}
    nodes: dict[str, int] = {}
    # Scoring starts on the first actor ready, not all of them: a cluster that lost a node (still counted
    # in its resources for a while) runs on the nodes left; a job of a few chunks may end on one actor.
    _commit_as_they_arrive(job, scored.iter_batches(batch_size=None, batch_format="pyarrow"), parts, nodes, advance)
    if parts:
        raise JobError(f"Ray returned incomplete rows for chunks {sorted(parts)}")
    return nodes


def _commit_as_they_arrive(job: Job, batches, parts: dict[int, list], nodes: dict[str, int], advance) -> None:
    """Regroup the rows by chunk (Ray Data may merge or split the actors' outputs into blocks); commit a
    chunk once all its rows are in; count the images each node scored. A chunk that arrives again (Ray
    re-running a task whose output it lost) is ignored once committed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    committed: set[int] = set()
    for batch in batches:
        for k in sorted(set(batch.column("chunk").to_pylist()) - committed):
            rows = batch.filter(pc.equal(batch.column("chunk"), k))
            for node in set(rows.column("node").to_pylist()):
                nodes[node] = nodes.get(node, 0) + pc.sum(pc.equal(rows.column("node"), node)).as_py()
            parts.setdefault(k, []).append(rows.drop_columns(["chunk", "node"]))
            lo, hi = job.chunk_range(k)
            if sum(t.num_rows for t in parts[k]) == hi - lo:
                job.commit_table(k, pa.concat_tables(parts.pop(k)))
                committed.add(k)
                advance(hi - lo)
