"""`protoserve review`: the review loop on one machine: a registry, the service following it, a worker.

The registry (default runs/review/registry) gets the given bundle and its checkpoint as its first
version if it is empty; then `bentoml serve` (registry mode) and `protoserve worker` run until
Ctrl+C. The admin key comes from PROTOSERVE_ADMIN_KEY; when it is unset, one is made for this run
and printed once here (the service never logs it).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from protoserve.settings import environ, settings
from registry.versions import Registry
from service.demo import REPO, running_service, stop


def run_review(bundle: Path, checkpoint: Path, root: Path, port: int, data_root: str | None,
               host: str = "127.0.0.1") -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a TERM stops the service and the worker too, as Ctrl+C does
    registry = Registry(root)
    if not registry.store.versions():
        row = registry.register(bundle, checkpoint)
        registry.promote(row.version, actor="protoserve review")
        try:
            from revision.neighbours import write_neighbours

            write_neighbours(registry, row.version, data_root)
        except Exception as e:  # the page works without them (no training install, no data)
            print(f"nearest training images not computed ({type(e).__name__}: {e})")
    key = settings().admin_key or secrets.token_urlsafe(18)
    made = settings().admin_key is None
    env = environ(admin_key=key, registry=root.resolve(), workers=2)
    worker_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    log_dir = root.parent
    worker_cmd = [sys.executable, "-m", "cli.main", "worker", "--registry", str(root.resolve())]
    if data_root:
        worker_cmd += ["--data-root", data_root]
    with open(log_dir / "worker.log", "ab") as worker_log:
        worker = subprocess.Popen(worker_cmd, cwd=REPO, env=worker_env, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        with running_service(registry.active_bundle(), port, log_dir / "serve.log", env=env, host=host) as url:
            print(f"review page: {url}/review/   (active version {registry.store.active().version})")
            if host != "127.0.0.1":
                print(f"  from another device (a phone): http://<this machine's address>:{port}/review/")
            if made:
                print(f"admin key for this run: {key}\n  (enter it once in the page; to choose your own, "
                      "export PROTOSERVE_ADMIN_KEY=... before make review)")
            else:
                print("admin key: the PROTOSERVE_ADMIN_KEY of this shell (enter it once in the page)")
            print(f"logs: {log_dir / 'serve.log'}, {log_dir / 'worker.log'}; Ctrl+C stops both")
            while worker.poll() is None:
                time.sleep(1)
            print(f"the worker exited ({worker.returncode}); see {log_dir / 'worker.log'}")
    finally:
        stop(worker)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
