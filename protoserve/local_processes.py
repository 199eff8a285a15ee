"""What every local server a command or test starts needs: free ports, and a stop that ends its group.

Used by the service's runner (service/demo.py), the throwaway PostgreSQL (registry/local_postgres.py),
SeaweedFS (registry/local_s3.py) and the Ray nodes (scoring/local_ray.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group `process` leads (started with start_new_session=True); SIGKILL it if it
    has not ended after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
