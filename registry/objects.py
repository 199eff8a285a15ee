"""Versions in an S3 object store: uploaded when registered, downloaded into a verified local cache.

With PROTOSERVE_VERSIONS_URL=s3://bucket/prefix a registered version is the objects
`prefix/<version>/<content>/bundle/<file>` (every file of the bundle, manifest.json written last) and
`prefix/<version>/<content>/checkpoint.pt`, <content> the first 16 hex digits of the manifest's sha256;
the registry row holds their URLs pinned to a sha256, as pip pins a download:
`s3://bucket/prefix/<version>/<content>/bundle#sha256=<sha256 of manifest.json>`. The manifest lists
the sha256 of every other file, so the pin covers the whole bundle. Two registers of one version at once
upload side by side, and the row written points at its own objects (the other's stay, unreferenced).

A replica resolves a pinned URL to a local folder under PROTOSERVE_CACHE_DIR, addressed by that
sha256 (`bundles/<sha256>/`, `files/<sha256>/checkpoint.pt`): it downloads manifest.json, checks it
against the pin and reads it (bundle/manifest.py read_manifest), downloads the files it lists into a
private folder, checks each one's sha256, and only then moves the folder into place. A tampered or
truncated object is refused with a ChecksumError naming it; nothing half-downloaded is ever in the
cache. One process at a time downloads a given pin into a cache (a lock file under `locks/`): the
workers of one replica share its cache, and the others wait and then read the copy. A version is
immutable, so a cached copy is never fetched again (loading it reads and checks it once more:
bundle/manifest.py read_bundle). Service replicas fetch the versions likely to be
activated next before anyone promotes them (service/served_version.py); a promote that arrives while
that download is under way waits for it instead of starting another.

The endpoint is PROTOSERVE_S3_ENDPOINT_URL (else boto3's own: AWS_ENDPOINT_URL_S3, or AWS); the
credentials are boto3's (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, an instance role)
and appear in no message. boto3 is imported only when an s3:// location is used (the `s3` extra).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bundle.manifest import MANIFEST_FILE, BundleError, read_manifest, sha256_file
from protoserve.settings import settings, variable
from registry.store import RegistryError

SCHEME = "s3://"
PIN = "#sha256="
CHECKPOINT_FILE = "checkpoint.pt"
CONTENT_DIGITS = 16  # of the manifest sha256 in a version's object prefix: registers of one version never collide
CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
PARALLEL = 8  # objects sent or fetched at once (boto3's connection pool holds 10)


class ObjectStoreError(RegistryError):
    """An object store that cannot be reached, read or written (one line, never a credential)."""


class ChecksumError(BundleError):
    """A downloaded object whose sha256 is not the one its manifest or pin says: damaged or edited."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class ObjectUrl:
    bucket: str
    key: str  # no leading or trailing slash; "" is the bucket's root

    @classmethod
    def parse(cls, url: str) -> ObjectUrl:
        if not is_remote(url):
            raise ObjectStoreError(f"{url!r}: not an s3://bucket/key URL")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not bucket:
            raise ObjectStoreError(f"{url!r}: no bucket named (s3://bucket/prefix)")
        return cls(bucket, key.strip("/"))

    def child(self, *parts: str) -> ObjectUrl:
        return ObjectUrl(self.bucket, "/".join(p for p in (self.key, *parts) if p))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def pinned(url: ObjectUrl, sha256: str) -> str:
    return f"{url}{PIN}{sha256}"


def unpin(location: str) -> tuple[ObjectUrl, str | None]:
    """(the object URL, the sha256 it is pinned to, or None)."""
    url, _, sha256 = location.partition(PIN)
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ObjectStoreError(f"{location}: the pin is not a sha256 (64 hex digits)")
    return ObjectUrl.parse(url), sha256 or None


class ObjectStore:
    """An S3 endpoint as the registry uses it: upload a version, resolve a pinned URL to a verified local copy."""

    def __init__(self, endpoint_url: str | None = None, cache_dir: str | Path | None = None):
        s = settings()
        self.endpoint_url = endpoint_url if endpoint_url is not None else s.s3_endpoint_url
        self.cache = Path(cache_dir if cache_dir is not None else s.cache_dir).expanduser()
        self.client = s3_client(self.endpoint_url)  # thread-safe: the transfers below share it
        self._fetching: dict[str, threading.Lock] = {}  # pin -> held while this process downloads it
        self._guard = threading.Lock()

    # Writing a version (the registering host)

    def upload_version(self, versions: ObjectUrl, version: str, bundle: Path,
                       checkpoint: Path | None) -> tuple[str, str | None]:
        """Upload a verified bundle (and its checkpoint) as `<versions>/<version>/<content>/`; the pinned URLs to
        record. <content> is the first 16 hex digits of the manifest's sha256: two registers of one version at
        once (a job attempt whose lease ran out and the attempt that took over) never write over each other's
        objects, so the row that is written points at objects that match its pin."""
        manifest_sha = sha256_file(bundle / MANIFEST_FILE)
        target = versions.child(version, manifest_sha[:CONTENT_DIGITS])
        files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
        _each(lambda name: self._put(bundle / name, target.child("bundle", name)),
              [f for f in files if f != MANIFEST_FILE])
        self._put(bundle / MANIFEST_FILE, target.child("bundle", MANIFEST_FILE))  # last: then the bundle is whole
        checkpoint_location = None
        if checkpoint is not None:
            self._put(checkpoint, target.child(CHECKPOINT_FILE))
            checkpoint_location = pinned(target.child(CHECKPOINT_FILE), sha256_file(checkpoint))
        return pinned(target.child("bundle"), manifest_sha), checkpoint_location

    def _put(self, path: Path, url: ObjectUrl) -> None:
        with readable(url, self.endpoint_url), open(path, "rb") as body:
            self.client.put_object(Bucket=url.bucket, Key=url.key, Body=body)

    # Reading a version (every replica)

    def bundle(self, location: str) -> Path:
        """The local, verified copy of the bundle at a pinned URL: from the cache, else downloaded."""
        url, pin = unpin(location)
        with self._one_download(pin):  # a prefetch under way: wait for it rather than fetch twice
            if pin is not None and (self.cache / "bundles" / pin).is_dir():
                return self.cache / "bundles" / pin
            return self._download_bundle(url, pin)

    def _download_bundle(self, url: ObjectUrl, pin: str | None) -> Path:
        with self._download() as folder:
            manifest_path = folder / MANIFEST_FILE
            self._get(url.child(MANIFEST_FILE), manifest_path, pin)
            manifest = read_manifest(manifest_path)  # refuses a file entry outside the bundle, among the rest
            _each(lambda item: self._get(url.child(item[0]), folder / item[0], item[1]), manifest.files.items())
            return _settle(folder, self.cache / "bundles" / (pin or sha256_file(manifest_path)))

    def file(self, location: str) -> Path:
        """The local, verified copy of a single pinned object (a checkpoint)."""
        url, pin = unpin(location)
        if pin is None:
            raise ObjectStoreError(f"{location}: no sha256 pin ({PIN}...): cannot be verified")
        name = PurePosixPath(url.key).name
        with self._one_download(pin):
            if (self.cache / "files" / pin / name).is_file():
                return self.cache / "files" / pin / name
            with self._download() as folder:
                self._get(url, folder / name, pin)
                return _settle(folder, self.cache / "files" / pin) / name

    def _get(self, url: ObjectUrl, path: Path, sha256: str | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with readable(url, self.endpoint_url), open(path, "wb") as out:
            body = self.client.get_object(Bucket=url.bucket, Key=url.key)["Body"]
            for block in body.iter_chunks(1 << 20):
                out.write(block)
        found = sha256_file(path)
        if sha256 is not None and found != sha256:
            raise ChecksumError(f"{url}: sha256 {found[:12]}... is not the {sha256[:12]}... its manifest (or "
                                "registry row) names: damaged, truncated or edited in the object store")

    @contextmanager
    def _one_download(self, pin: str | None) -> Iterator[None]:
        """Held while this process, or another sharing the cache (a replica's workers), downloads the object
        pinned to `pin` (None: nothing to share): the others wait, then find it in the cache."""
        if pin is None:
            yield
            return
        with self._guard:
            lock = self._fetching.setdefault(pin, threading.Lock())
        with lock:
            locks = self.cache / "locks"  # one empty file per version fetched
            locks.mkdir(parents=True, exist_ok=True)
            with open(locks / pin, "a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
                yield

    @contextmanager
    def _download(self) -> Iterator[Path]:
        """A private folder in the cache for one download, removed unless it was settled into place."""
        self.cache.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def s3_client(endpoint_url: str | None):
    """A boto3 S3 client; credentials are boto3's to find (the AWS variables, a profile, a role). The one
    client construction of protoserve: the registry's versions and `protoserve score`'s s3:// inputs and
    outputs (scoring/bucket.py) both use it."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path"} if endpoint_url else None)  # a custom endpoint: no bucket DNS
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _settle(folder: Path, target: Path) -> Path:
    """Move a verified download to its content address (another process may have put the same there first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, target)
    except OSError:  # there already (a non-empty folder): the same content, by its address
        pass
    return target


def _each(call, items) -> None:
    """call(item) for every item, PARALLEL at a time; the first error raised is raised here."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        for _ in pool.map(call, items):
            pass


@contextmanager
def readable(url: ObjectUrl, endpoint_url: str | None, fix: str | None = None) -> Iterator[None]:
    """Turn boto3's errors on one object into one ObjectStoreError line an operator can act on; `fix`: what
    names the bucket (default: PROTOSERVE_VERSIONS_URL)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, OSError) as e:
        endpoint = endpoint_url or "the default AWS endpoint"
        raise ObjectStoreError(f"{url}: {explain(e, url.bucket, endpoint, fix)}") from None


def explain(error: BaseException, bucket: str, endpoint: str, fix: str | None = None) -> str:
    """What went wrong with an S3 call, in words (no credential, no traceback)."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return f"no S3 credentials: set {CREDENTIALS}"
    if isinstance(error, EndpointConnectionError):
        return f"cannot reach the S3 endpoint {endpoint} (set {variable('s3_endpoint_url')})"
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return f"no bucket {bucket!r} at {endpoint} (create it, or fix {fix or variable('versions_url')})"
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such object (deleted from the store, or never uploaded)"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"):
            return f"access denied by {endpoint} ({code}: check {CREDENTIALS} and the bucket's policy)"
        return f"{code or 'error'} from {endpoint}: {error.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    return f"{type(error).__name__}: {error}"
