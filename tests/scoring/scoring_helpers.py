"""Writers for every input format of `protoserve score`, and a way to run the CLI."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format=fmt)
    return buffer.getvalue()


def write_idx(path: Path, images: np.ndarray, compress: bool = False) -> Path:
    data = struct.pack(">BBBB", 0, 0, 0x08, images.ndim) + struct.pack(f">{images.ndim}I", *images.shape)
    data += images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_parquet(path: Path, values: list[bytes | None], column: str = "image") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"name": [f"n{i}" for i in range(len(values))], column: pa.array(values, pa.binary())})
    pq.write_table(table, path, row_group_size=37)  # several row groups: ranges cross their borders
    return path


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        import json

        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
