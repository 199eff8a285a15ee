"""Resume after SIGKILL: a job killed at any moment and run again holds every input exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scoring_helpers import REPO, png_bytes, read_rows, write_idx

from scoring.job import JobSpec
from scoring.run import run_scoring_job

CHUNK = 250
CHUNKS = 49  # 12,000 records and 150 files


@pytest.fixture(scope="module")
def job_inputs(digits, tmp_path_factory) -> list[str]:
    """12,000 IDX records and 150 picture files with two bad ones: 49 chunks of 250."""
    root = tmp_path_factory.mktemp("resume_inputs")
    idx = write_idx(root / "images-idx3-ubyte.gz", np.concatenate([digits] * 40), compress=True)
    folder = root / "pictures"
    folder.mkdir()
    for i in range(148):
        (folder / f"{i:03d}.png").write_bytes(png_bytes(digits[i]))
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.txt").write_text("not a picture")
    return [str(idx), str(folder)]


@pytest.fixture(scope="module")
def reference(tiny_bundle, job_inputs, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference") / "reference.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), job_inputs, out, chunk_size=CHUNK, workers=2), progress=False)
    return read_rows(out)


def start(bundle: Path, inputs: list[str], out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "cli.main", "score", "--model", str(bundle), "--input", *inputs,
            "--output", str(out), "--chunk-size", str(CHUNK), "--workers", "2", "--quiet"]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate()


def finish(bundle: Path, inputs: list[str], out: Path) -> None:
    process = start(bundle, inputs, out)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr


def check_output_after_kill(out: Path, reference: list[dict]) -> None:
    """Whatever the moment of the kill, an output file that exists is the whole, final output."""
    if out.exists():
        assert read_rows(out) == reference


def check_exactly_once(out: Path, reference: list[dict], note: str) -> None:
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(len(reference))), note
    assert [r["input_id"] for r in rows] == [r["input_id"] for r in reference], note
    assert len({r["input_id"] for r in rows}) == len(rows), note
    assert rows == reference, note
    job_dir = out.with_name(out.name + ".job")
    assert sorted(p.name for p in job_dir.iterdir()) == ["complete.json", "job.json"], note


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_killed_after_some_chunks_resumes_the_rest(tiny_bundle, job_inputs, reference, tmp_path):
    out = tmp_path / "out.parquet"
    job_dir = tmp_path / "out.parquet.job"
    process = start(tiny_bundle, job_inputs, out)
    wait_for(lambda: len(list(job_dir.glob("chunk-*.arrow"))) >= 3 or process.poll() is not None)
    kill(process)
    committed = {p.name for p in job_dir.glob("chunk-*.arrow")}
    assert 3 <= len(committed) < CHUNKS and not out.exists()
    finish(tiny_bundle, job_inputs, out)
    check_exactly_once(out, reference, "killed after 3 chunks")
    assert sum(r["error"] is not None for r in read_rows(out)) == 2


@pytest.mark.slow
def test_sigkill_at_random_moments(tiny_bundle, job_inputs, reference, tmp_path):
    """Several trials, each killed once or twice at random moments over a whole run (start-up, scoring,
    committing a chunk, assembling the output), then run to completion. The first kill is stratified
    by progress, not by a clock (a timed run on a busy machine says little about the next one):
    trial i is killed once a random number of chunks in the i-th fifth of the job is committed, plus
    a random fraction of a chunk's time; trial 0 during start-up. A second kill falls anywhere."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    timed = tmp_path / "timed.parquet"
    started = time.monotonic()
    process = start(tiny_bundle, job_inputs, timed)
    wait_for(lambda: any((tmp_path / "timed.parquet.job").glob("chunk-*.arrow")) or process.poll() is not None)
    first_chunk = time.monotonic() - started
    process.communicate(timeout=300)
    assert process.returncode == 0
    full_run = time.monotonic() - started
    per_chunk = max(full_run - first_chunk, 0.0) / CHUNKS
    trials = 5
    committed_at_kill = []
    for trial in range(trials):
        out = tmp_path / f"trial{trial}.parquet"
        job_dir = tmp_path / f"trial{trial}.parquet.job"
        kills = []
        for attempt in range(rng.choice([1, 2])):
            process = start(tiny_bundle, job_inputs, out)
            began = time.monotonic()
            if attempt == 0 and trial == 0:
                time.sleep(rng.uniform(0, first_chunk))
            elif attempt == 0:
                target = rng.randint(trial * CHUNKS // trials, (trial + 1) * CHUNKS // trials - 1)
                wait_for(lambda d=job_dir, t=target, p=process: committed(d) >= t or p.poll() is not None, timeout=300)
                time.sleep(rng.uniform(0, per_chunk))
            else:
                time.sleep(rng.uniform(0, full_run))
            kill(process)
            kills.append(round(time.monotonic() - began, 2))
            committed_at_kill.append(committed(job_dir))
            check_output_after_kill(out, reference)
        finish(tiny_bundle, job_inputs, out)
        check_exactly_once(out, reference, f"seed {seed}, trial {trial}, killed after {kills} s of {full_run:.1f} s")
    print(f"seed {seed}: chunks committed when killed: {committed_at_kill} (of {CHUNKS})")
    assert any(0 < c < CHUNKS for c in committed_at_kill), f"seed {seed}: no kill landed while scoring"


def committed(job_dir: Path) -> int:
    return len(list(job_dir.glob("chunk-*.arrow"))) if job_dir.exists() else 0


@pytest.mark.slow
def test_killed_while_assembling_the_output(tiny_bundle, job_inputs, reference, tmp_path):
    """Kill once every chunk is committed (the output being assembled or renamed), then resume."""
    out = tmp_path / "out.jsonl"
    job_dir = tmp_path / "out.jsonl.job"
    process = start(tiny_bundle, job_inputs, out)
    wait_for(lambda: len(list(job_dir.glob("chunk-*.arrow"))) == CHUNKS or process.poll() is not None)
    kill(process)
    check_output_after_kill(out, [dict(r) for r in reference])
    finish(tiny_bundle, job_inputs, out)
    check_exactly_once(out, reference, "killed while assembling")


def test_killed_while_dropping_the_chunks_of_a_finished_job(tiny_bundle, job_inputs, reference, tmp_path):
    """complete.json is written before the chunks go: a rerun finds the job done and drops what is left."""
    out = tmp_path / "out.parquet"
    spec = JobSpec(str(tiny_bundle), job_inputs, out, chunk_size=CHUNK, workers=2)
    run_scoring_job(spec, progress=False)
    job_dir = tmp_path / "out.parquet.job"
    for k in (3, 7):  # as if SIGKILLed between unlinking chunk 2 and chunk 3
        (job_dir / f"chunk-{k:06d}.arrow").write_bytes(b"left over")
    run_scoring_job(spec, progress=False)
    check_exactly_once(out, reference, "rerun of a finished job")


def test_a_second_run_of_a_running_job_is_refused_and_a_killed_holder_blocks_nothing(
        tiny_bundle, job_inputs, reference, tmp_path):
    """Two runs of one job could commit over each other's chunks (or --restart could remove them):
    the output's lock file refuses the second; the kernel frees it when the holder is SIGKILLed."""
    out = tmp_path / "out.parquet"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from scoring.job import job_lock\n"
                               "with job_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)",
                               str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = start(tiny_bundle, job_inputs, out)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 2
        assert stderr.strip().splitlines()[-1].endswith(
            f"{out}: another protoserve score is running this job (it holds {out}.lock); "
            "wait for it to finish or stop it")
        assert not out.exists() and not (tmp_path / "out.parquet.job").exists()  # touched nothing
    finally:
        kill(holder)
    finish(tiny_bundle, job_inputs, out)
    check_exactly_once(out, reference, "after a killed lock holder")


def test_the_parquet_output_grows_in_chunk_order_while_chunks_commit_out_of_order(tiny_bundle, digits, tmp_path):
    from bundle.runtime import classify, open_session
    from scoring.job import Job

    np.save(tmp_path / "d.npy", digits[:10])
    out = tmp_path / "o.parquet"
    job = Job(JobSpec(str(tiny_bundle), [str(tmp_path / "d.npy")], out, chunk_size=3))
    job.start()
    session, _ = open_session(job.bundle.model_path, "cpu")

    def infer(x):
        return classify(session, x, job.scorer.features)

    job.assemble_while_scoring(list(range(job.chunks)))
    appended = []
    for k in (2, 0, 3, 1):  # as the worker threads may finish them
        lo, ids, values = job.read_inputs(k)
        job.commit(k, job.scorer.score(lo, ids, values, infer))
        appended.append(job.assembly.next)
    assert appended == [0, 1, 1, 4] and job.assembly.complete()
    job.finish()
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["input_id"] for r in rows] == [f"{tmp_path / 'd.npy'}#{i}" for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "o.parquet.job").iterdir()) == ["complete.json", "job.json"]
