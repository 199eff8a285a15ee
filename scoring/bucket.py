"""The objects of a batch job in an S3 object store: s3:// inputs listed and read, an s3:// output's
chunks, plan and result uploaded (scoring/inputs.py and scoring/job.py use it).

The client is the registry's (registry/objects.py s3_client): the endpoint is PROTOSERVE_S3_ENDPOINT_URL
(else boto3's own), the credentials boto3's (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, an
instance role), never in a message. Every failure is one ObjectStoreError line naming the URL and what to
fix (a missing bucket, an unreachable endpoint, a refused key).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protoserve.settings import settings, variable
from registry.objects import PARALLEL, ObjectStoreError, ObjectUrl, is_remote, readable, s3_client

__all__ = ["Bucket", "ObjectInfo", "ObjectStoreError", "ObjectUrl", "is_remote"]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


class Bucket:
    """One S3 bucket through the shared client; `fix` says, in refusals, which option names it."""

    def __init__(self, name: str, fix: str):
        self.name, self.fix = name, fix
        self.endpoint_url = settings().s3_endpoint_url
        self.client = s3_client(self.endpoint_url)  # thread-safe: the parallel reads share it

    def _readable(self, key: str):
        return readable(ObjectUrl(self.name, key), self.endpoint_url,
                        f"{self.fix}, or {variable('s3_endpoint_url')} for the endpoint")

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order (S3 lists in UTF-8 byte order)."""
        found: list[ObjectInfo] = []
        with self._readable(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
                found += [ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'))
                          for o in page.get("Contents", [])]
        return sorted(found, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._readable(key):
            try:
                self.client.head_object(Bucket=self.name, Key=key)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return True

    def read(self, key: str) -> bytes:
        with self._readable(key):
            return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def read_many(self, keys: list[str]) -> list[bytes | ObjectStoreError]:
        """The objects' bytes in order, PARALLEL at a time; an object that cannot be read is its error."""
        def one(key: str) -> bytes | ObjectStoreError:
            try:
                return self.read(key)
            except ObjectStoreError as e:
                return e

        with ThreadPoolExecutor(min(PARALLEL, max(1, len(keys)))) as pool:
            return list(pool.map(one, keys))

    def download(self, key: str, path: Path) -> None:
        """The object into `path` (through a temporary file: a path that exists is whole)."""
        tmp = path.with_name(path.name + ".download")
        with self._readable(key):
            self.client.download_file(self.name, key, str(tmp))
        tmp.replace(path)

    def upload(self, path: Path, key: str) -> None:
        """`path` as the object `key` (S3 makes an object visible only once it is whole, multipart included)."""
        with self._readable(key):
            self.client.upload_file(str(path), self.name, key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1,000 keys
            batch = keys[start:start + 1000]
            with self._readable(batch[0]):
                self.client.delete_objects(Bucket=self.name, Delete={"Objects": [{"Key": k} for k in batch],
                                                                     "Quiet": True})
