"""Model versions: register a bundle (with its checkpoint), promote, roll back; torch-free.

A registry is a directory and a database (registry/store.py: `registry.sqlite` in the directory, or
the one PROTOSERVE_REGISTRY_DB names, e.g. PostgreSQL for replicas on several machines). The
directory's `versions/<version>/` holds each registered version's copy of its bundle (`bundle/`) and
the checkpoint it came from (`checkpoint.pt`), so a version never changes under the registry and can
be revised again. PROTOSERVE_REGISTRY names the directory. PROTOSERVE_VERSIONS_URL may put the versions
elsewhere: another folder, or an S3 object store (s3://bucket/prefix, registry/objects.py), where a
version is uploaded before its row is written and every host downloads it into a verified local cache
before reading it. A bundle is verified (schema, sha256 of every file, golden probe) when it is
registered and again when it is promoted or rolled back to: a version that fails
is never activated, and the active one stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from bundle.manifest import Bundle, BundleError, Manifest
from bundle.runtime import verify_bundle
from protoserve.settings import settings, variable
from registry.objects import ObjectStore, ObjectUrl, is_remote
from registry.store import Active, RegistryError, Store, VersionRow, database_location

ENV = variable("registry")
NEIGHBOURS_FILE = "neighbours.json"  # a version's nearest training images (revision/neighbours.py writes it)


def registry_location() -> Path | None:
    """The registry directory the environment names (PROTOSERVE_REGISTRY), or None: a fixed bundle."""
    return settings().registry


def open_registry(root: str | Path | None = None, db: str | None = None) -> Registry:
    root = Path(root) if root else registry_location()
    if root is None:
        raise RegistryError(f"no registry: pass --registry DIR or set {ENV}")
    return Registry(root, db)


class Registry:
    """The versions under one registry directory and its database (`db`: a URL; default PROTOSERVE_REGISTRY_DB,
    else the directory's registry.sqlite; the versions themselves: `versions_url`)."""

    def __init__(self, root: str | Path, db: str | None = None, versions_url: str | None = None,
                 objects: ObjectStore | None = None):
        self.root = Path(root)
        self.store = Store(database_location(db or settings().registry_db, self.root))
        url = versions_url if versions_url is not None else settings().versions_url
        if url and not is_remote(url):
            url = str(Path(url).expanduser().resolve())  # the rows hold absolute paths, whatever the cwd
        self.versions_url = url or str(self.root / "versions")
        self._objects = objects

    @property
    def objects(self) -> ObjectStore:
        """The object store that s3:// locations are read from and written to (built on first use)."""
        if self._objects is None:
            self._objects = ObjectStore()
        return self._objects

    def version_dir(self, version: str) -> Path:
        """The version's folder on this host: its bundle and checkpoint (folder mode), its nearest training
        images (both modes; with s3:// versions, on the host that computed them)."""
        if is_remote(self.versions_url):
            return self.root / "versions" / version
        return Path(self.versions_url) / version

    def register(self, bundle: str | Path, checkpoint: str | Path | None = None, parent: str | None = None,
                 status: str = "registered", lineage: dict | None = None, job_id: int | None = None) -> VersionRow:
        """Verify the bundle, copy it (and its checkpoint) into the registry, record the version."""
        checked, _ = verify_bundle(bundle)
        lineage = lineage if lineage is not None else _manifest_lineage(checked)
        if parent is None and (lineage or {}).get("parent"):
            parent = lineage["parent"].rpartition(":")[2]  # the lineage names the parent as name:version
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise RegistryError(f"{checkpoint}: checkpoint file not found")
        if is_remote(self.versions_url):
            return self._register_remote(checked, checkpoint, parent, status, lineage, job_id)
        with self._folder_lock():
            return self._register_folder(checked, checkpoint, parent, status, lineage, job_id)

    @contextlib.contextmanager
    def _folder_lock(self):
        """One register at a time into this versions folder (every process on this host, and on others where
        a shared file system honours flock): two registers of one version would remove each other's files."""
        folder = Path(self.versions_url)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".register.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _register_folder(self, checked: Bundle, checkpoint: str | Path | None, parent: str | None, status: str,
                         lineage: dict | None, job_id: int | None) -> VersionRow:
        """Copy the verified bundle (and checkpoint) into versions/<version>/, then write the row."""
        m = checked.manifest
        target = self.version_dir(m.version)
        if self.store.find_version(m.version) is not None:
            raise RegistryError(f"version {m.version!r} is registered already ({target}); versions are immutable")
        if target.exists():
            shutil.rmtree(target)  # the files of a register killed before it wrote the row: never a version
        staging = target.with_name(f".{m.version}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(checked.path, staging / "bundle")
            if checkpoint is not None:
                shutil.copy2(checkpoint, staging / "checkpoint.pt")
            verify_bundle(staging / "bundle")  # the copy is what will be served
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            return self.store.add_version(m.version, m.name, m.family, str(target / "bundle"),
                                          str(target / "checkpoint.pt") if checkpoint is not None else None,
                                          parent, status, lineage, version_metrics(m), job_id)
        except RegistryError:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def _register_remote(self, checked: Bundle, checkpoint: str | Path | None, parent: str | None, status: str,
                         lineage: dict | None, job_id: int | None) -> VersionRow:
        """Upload the verified bundle and checkpoint to the object store, then write the row pinning them."""
        m = checked.manifest
        if any(row.version == m.version for row in self.store.versions()):
            raise RegistryError(f"version {m.version!r} is registered already; versions are immutable")
        # Uploaded under a prefix of the manifest's sha256: a register racing this one for the same version
        # (or one that died before its row) never overwrites these objects; only one row is written.
        bundle, saved = self.objects.upload_version(ObjectUrl.parse(self.versions_url), m.version, checked.path,
                                                    Path(checkpoint) if checkpoint is not None else None)
        return self.store.add_version(m.version, m.name, m.family, bundle, saved, parent, status, lineage,
                                      version_metrics(m), job_id)

    def bundle_path(self, version: str) -> Path:
        location = self.store.version(version).bundle
        return self.objects.bundle(location) if is_remote(location) else Path(location)

    def checkpoint_path(self, version: str) -> Path | None:
        """The version's checkpoint on this host (downloaded and verified when it is in an object store), or None."""
        location = self.store.version(version).checkpoint
        if location is None:
            return None
        return self.objects.file(location) if is_remote(location) else Path(location)

    def likely_next(self, newest: int) -> list[str]:
        """The versions a promote or rollback may make active next: the previous one, then the `newest` most
        recently registered that no promote or rollback ever made active."""
        previous = self.store.active().previous
        return ([previous] if previous else []) + self.store.never_active(newest)

    def prefetch(self, versions: list[str]) -> dict[str, str]:
        """Bring these versions' s3:// bundles into this host's verified cache now, so that activating one
        later waits on no download (folder versions are local already). Returns {version: why not} for
        the ones that could not be fetched (a damaged object: its promote is refused the same way)."""
        failed = {}
        for version in versions:
            try:
                location = self.store.version(version).bundle
                if is_remote(location):
                    self.objects.bundle(location)
            except (RegistryError, BundleError) as e:
                failed[version] = str(e)
        return failed

    def verify(self, version: str) -> Bundle:
        """Verify a registered version's bundle now (RegistryError naming the problem)."""
        try:
            bundle, _ = verify_bundle(self.bundle_path(version))
        except BundleError as e:
            raise RegistryError(f"version {version!r} fails verification, not activated: {e}") from None
        return bundle

    def promote(self, version: str, actor: str | None = None) -> Active:
        """Make `version` active (after verifying it); the active one becomes the previous."""
        generation = self.store.active().generation
        self.verify(version)
        return self.store.activate(version, actor, expect_generation=generation)

    def rollback(self, actor: str | None = None) -> Active:
        """Make the previous version active again (after verifying it)."""
        previous = self.store.active().previous
        if previous is None:
            raise RegistryError("nothing to roll back to: no previous version")
        self.verify(previous)
        return self.store.roll_back(actor, expect_previous=previous)  # the version just verified, or none

    def neighbours(self, version: str) -> dict | None:
        """The version's nearest training images per prototype id, or None when not computed."""
        path = self.version_dir(version) / NEIGHBOURS_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"{path}: not readable ({e})") from None

    def active_bundle(self) -> Path:
        active = self.store.active()
        if active.version is None:
            raise RegistryError(f"{self.root}: no active version yet (protoserve registry promote VERSION)")
        return self.bundle_path(active.version)


def _manifest_lineage(bundle: Bundle) -> dict | None:
    """The manifest's `lineage` (a revised bundle's parent, verdicts, comparison), when it has one."""
    lineage = getattr(bundle.manifest, "lineage", None)
    if lineage is None:
        return None
    return lineage if isinstance(lineage, dict) else lineage.model_dump(mode="json")


def version_metrics(m: Manifest) -> dict:
    """The figures a version's row keeps from its manifest: test accuracy, and the held-out outliers'
    when the bundle has them (export/outlier_figures.py)."""
    o = m.domain.outliers if m.domain is not None else None
    return {"test_accuracy": m.metrics.test_accuracy,
            **({} if o is None else {"outliers_flagged": o.flagged, "outliers_fpr95": o.fpr95,
                                     "outlier_exposure": o.trained_with is not None})}
