"""The registry: immutable versions, promote and rollback as single transactions, verification gate."""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from registry.job_failures import FAILURES
from registry.revision_settings import RevisionSettings
from registry.store import RegistryError, Store
from registry.verdicts import verdict
from registry.versions import Registry


def test_register_copies_and_verifies(two_versions):
    registry, v1, v2 = two_versions
    rows = {r.version: r for r in registry.store.versions()}
    assert set(rows) == {v1, v2}
    assert Path(rows[v1].bundle).is_relative_to(registry.root) and Path(rows[v1].checkpoint).is_file()
    assert rows[v2].parent == v1 and [r.version for r in registry.store.lineage(v2)] == [v2, v1]
    with pytest.raises(RegistryError, match="registered already"):
        registry.register(rows[v1].bundle)


def test_the_files_of_a_register_killed_before_its_row_do_not_block_the_next(registry_engine, tiny_bundle, tmp_path):
    """A register copies the version into place, then writes its row: killed in between, the folder is there
    without a row. That is no version: the next register of it replaces the folder."""
    registry = Registry(tmp_path / "registry")
    leftover = registry.version_dir("0.1.0") / "bundle"
    leftover.mkdir(parents=True)
    (leftover / "manifest.json").write_text("{half written")
    row = registry.register(tiny_bundle)
    assert row.version == "0.1.0" and registry.verify("0.1.0").manifest.version == "0.1.0"
    with pytest.raises(RegistryError, match="registered already"):  # with its row, it is one: immutable
        registry.register(tiny_bundle)


@pytest.mark.registry_engines("sqlite")
def test_database_is_wal_with_busy_timeout(two_versions):
    registry, *_ = two_versions
    db = sqlite3.connect(registry.store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_promote_and_rollback_move_active_previous_and_generation(two_versions):
    registry, v1, v2 = two_versions
    start = registry.store.active()
    assert (start.version, start.previous) == (v1, None)
    promoted = registry.promote(v2, actor="ada")
    assert (promoted.version, promoted.previous, promoted.generation) == (v2, v1, start.generation + 1)
    back = registry.rollback(actor="ada")
    assert (back.version, back.previous, back.generation) == (v1, v2, start.generation + 2)
    assert [c["action"] for c in registry.store.changes()] == ["promote", "promote", "rollback"]
    with pytest.raises(RegistryError, match="active already"):
        registry.promote(v1)


def test_rollback_without_previous_is_refused(registry_engine, tiny_bundle, tmp_path):
    registry = Registry(tmp_path / "r")
    registry.register(tiny_bundle)
    registry.promote("0.1.0")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


def test_damaged_version_is_never_activated(two_versions):
    registry, v1, v2 = two_versions
    onnx = Path(registry.store.version(v2).bundle) / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    before = registry.store.active()
    with pytest.raises(RegistryError, match="fails verification"):
        registry.promote(v2)
    assert registry.store.active() == before


def test_unknown_version_refused(two_versions):
    registry, *_ = two_versions
    with pytest.raises(RegistryError, match="not registered"):
        registry.promote("9.9.9")


def test_concurrent_promotes_are_serialised(two_versions):
    """Threads promoting and rolling back at once: every switch lands, the generation counts them all."""
    registry, v1, v2 = two_versions
    start = registry.store.active().generation
    store = Store(registry.store.url)
    errors = []

    def flip():
        for _ in range(10):
            try:
                active = store.active()
                store.activate(v2 if active.version == v1 else v1, expect_generation=active.generation)
            except RegistryError:
                errors.append(1)  # lost the race: the generation moved; nothing half-written

    threads = [threading.Thread(target=flip) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = registry.store.active()
    assert end.generation - start == 40 - len(errors) == len(registry.store.changes()) - 1


def test_verdicts_and_withdrawal(two_versions):
    registry, v1, _ = two_versions
    store = registry.store
    a = store.add_verdict(v1, verdict(3, "reject", 1, "ada", note="background"))
    b = store.add_verdict(v1, verdict(4, "accept", 1, "ada"))
    assert [v["id"] for v in store.verdicts(v1)] == [a["id"], b["id"]]
    store.withdraw_verdict(a["id"])
    assert [v["prototype_id"] for v in store.verdicts(v1)] == [4]
    assert len(store.verdicts(v1, include_withdrawn=True)) == 2
    with pytest.raises(RegistryError, match="withdrawn already"):
        store.withdraw_verdict(a["id"])
    with pytest.raises(RegistryError, match="not registered"):
        store.add_verdict("nope", verdict(1, "reject", 1, "ada"))


def test_job_lease_expires_then_fails(two_versions):
    registry, v1, _ = two_versions
    store = registry.store
    store.add_verdict(v1, verdict(3, "reject", 1, "ada"))
    job = store.add_job(v1, RevisionSettings(mode="mask", rounds=1))
    assert job["status"] == "queued" and job["settings"]["verdict_ids"]
    assert store.claim_job("w1", lease_seconds=-1)["status"] == "running"  # lease already run out: w1 "died"
    again = store.claim_job("w2", lease_seconds=-1)
    assert again["id"] == job["id"] and again["worker"] == "w2" and again["attempts"] == 2
    assert store.claim_job("w3", lease_seconds=60) is None  # a job that killed two workers is not retried
    failed = store.job(job["id"])
    assert failed["status"] == "failed" and "lease" in failed["error"]
    assert failed["reason"] == FAILURES["worker_lost"]
    assert not store.heartbeat(job["id"], "w2", 60)


def test_a_database_from_before_job_reasons_gains_the_column(tmp_path):
    path = tmp_path / "registry.sqlite"
    Store(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN reason")  # as an older protoserve created it,
    db.execute("DROP TABLE schema_version")  # before the schema had versions
    db.close()
    Store(path)
    db = sqlite3.connect(path)
    try:
        assert "reason" in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    finally:
        db.close()


def test_cli_verbs(two_versions):
    import subprocess
    import sys

    registry, v1, v2 = two_versions

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", "registry", "--registry", str(registry.root), *args],
                              capture_output=True, text=True)

    assert cli("promote", v2).returncode == 0 and registry.store.active().version == v2
    listed = cli("list").stdout
    assert f"* {v2}" in listed and f"- {v1}" in listed
    assert '"parent": "0.1.0"' in cli("lineage").stdout
    assert cli("rollback").returncode == 0 and registry.store.active().version == v1
    registry.store.add_verdict(v1, verdict(2, "reject", 1, "ada", note="blob"))
    lines = cli("verdicts").stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) | {"at": None} == {
        "prototype_id": 2, "verdict": "reject", "round": 1, "source": "ada", "at": None, "note": "blob"}
    bad = cli("promote", "9.9.9")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not registered" in bad.stderr


def test_register_if_missing_is_a_set_up_step_that_can_run_again(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    """`make register-oe` registers the shipped parent (promoted) and a candidate; run again, it changes nothing,
    and another bundle under a registered version is still refused."""
    from bundle.manifest import copy_as_version, read_bundle, write_manifest
    from cli.main import main

    root = str(tmp_path / "registry")
    candidate = copy_as_version(tiny_bundle, "0.2.0", tmp_path / "v2")
    for _ in range(2):
        assert main(["registry", "--registry", root, "register", str(tiny_bundle), "--checkpoint",
                     str(tiny_checkpoint), "--promote", "--if-missing"]) in (0, None)
        assert main(["registry", "--registry", root, "register", str(candidate), "--if-missing"]) in (0, None)
    registry = Registry(root)
    assert [(r.version, r.status) for r in registry.store.versions()] == [("0.1.0", "registered"),
                                                                         ("0.2.0", "registered")]
    assert registry.store.active().version == "0.1.0"
    assert capsys.readouterr().out.count("registered already, the same bundle") == 2
    other = copy_as_version(tiny_bundle, "0.2.0", tmp_path / "other")
    later = read_bundle(other).manifest.created_at + datetime.timedelta(seconds=1)
    write_manifest(other, read_bundle(other).manifest.model_copy(update={"created_at": later}))
    assert main(["registry", "--registry", root, "register", str(other), "--if-missing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'0.2.0' is registered already with another bundle" in err


def test_migrations_are_versioned_applied_once_and_a_newer_schema_is_refused(two_versions, capsys):
    from cli.main import main

    registry, v1, _ = two_versions
    latest = len(registry.store.engine.migrations)
    Store(registry.store.url)  # opened again: nothing to apply, nothing lost
    assert registry.store.schema_version() == latest and len(registry.store.dump()["schema_version"]) == latest
    assert registry.store.active().version == v1
    with registry.store.engine.write() as db:  # as a newer protoserve would leave it
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 'later')", (latest + 1,))
    registry.store.close()
    with pytest.raises(RegistryError, match=f"schema is version {latest + 1}, newer than this protoserve's {latest}"):
        Store(registry.store.url)
    assert main(["registry", "--registry", str(registry.root), "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upgrade protoserve" in err


def test_a_shadow_is_one_row_and_promoting_it_ends_it(two_versions):
    registry, v1, v2 = two_versions
    store = registry.store
    with pytest.raises(RegistryError, match="is the active one"):
        store.start_shadow(v1, 0.5)
    assert store.start_shadow(v2, 0.25, actor="ada")[:2] == (v2, 0.25)
    registry.promote(v2)
    assert store.shadow()[:2] == (None, 0)


def test_workers_claiming_at_once_never_share_a_job(two_versions):
    """Four claimants on their own connections: each queued job claimed exactly once (SKIP LOCKED on
    PostgreSQL, the one write lock on SQLite)."""
    registry, v1, _ = two_versions
    queued = [registry.store.add_job(v1, RevisionSettings(mode="prune"))["id"] for _ in range(24)]
    claimed: dict[str, list[int]] = {f"w{i}": [] for i in range(4)}

    def claim_all(name: str) -> None:
        store = Store(registry.store.url)
        while (job := store.claim_job(name, lease_seconds=60)) is not None:
            claimed[name].append(job["id"])

    threads = [threading.Thread(target=claim_all, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in claimed.values() for i in ids]
    assert sorted(every) == queued  # all claimed, none twice
    assert {j["id"]: j["worker"] for j in registry.store.jobs()} == {i: w for w, ids in claimed.items() for i in ids}


def _register_after(barrier, root: str, bundle: str, results) -> None:
    registry = Registry(root)
    barrier.wait()
    try:
        results.put(("ok", registry.register(bundle).version))
    except RegistryError as e:
        results.put(("refused", str(e)))


@pytest.mark.registry_engines("sqlite")
def test_registers_of_one_version_at_once_leave_one_whole_version(registry_engine, tiny_bundle, tmp_path):
    """Four processes register the same version at the same moment: one wins, the others are told it is
    registered already, and the winner's files are whole (no register removed another's folder)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        root = tmp_path / f"registry{attempt}"
        Registry(root)  # the database exists before the racers open it
        barrier, results = context.Barrier(4), context.Queue()
        racers = [context.Process(target=_register_after, args=(barrier, str(root), str(tiny_bundle), results))
                  for _ in range(4)]
        for p in racers:
            p.start()
        outcomes = [results.get(timeout=120) for _ in racers]
        for p in racers:
            p.join(timeout=60)
        assert sorted(kind for kind, _ in outcomes) == ["ok", "refused", "refused", "refused"], outcomes
        assert all("registered already" in text for kind, text in outcomes if kind == "refused"), outcomes
        assert Registry(root).verify("0.1.0").manifest.version == "0.1.0"
        assert not list((root / "versions").glob(".*staging*"))
