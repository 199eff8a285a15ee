"""The output of a scoring job: rows as Arrow, the Parquet file assembled while chunks commit, JSON Lines.

Nothing here knows the job's directory layout: callers pass where to write and how to read chunk k.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from scoring.rows import Columns

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PARQUET_GROUP_CHUNKS = 4  # chunks per row group of the Parquet output (16,384 rows by default)

ReadRows = Callable[[int], object]  # chunk number -> its rows (an Arrow table of row_schema)


def output_format(output: Path) -> str | None:
    """"parquet" or "jsonl" from the output's suffix; None for any other suffix."""
    return FORMATS.get(Path(output).suffix.lower())


def row_schema(plan: dict | None = None):
    """The Arrow schema of the rows (scoring/rows.py ROW_FIELDS); the job's plan as metadata when given."""
    import pyarrow as pa

    metadata = {b"protoserve.job": json.dumps(plan).encode()} if plan else None
    return pa.schema([
        ("index", pa.int64()), ("input_id", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
        ("probabilities", pa.list_(pa.float32())), ("prototype_ids", pa.list_(pa.int32())),
        ("prototype_distances", pa.list_(pa.float32())), ("prototype_similarities", pa.list_(pa.float32())),
        ("prototype_contributions", pa.list_(pa.float32())), ("in_domain", pa.bool_()), ("typicality", pa.float32()),
        ("abstained", pa.bool_()), ("true_label", pa.int32()), ("picture", pa.string()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("error", pa.string()),
    ], metadata=metadata)


def to_table(c: Columns):
    """Columns -> an Arrow table of row_schema (null prediction fields where a row has an error; null
    label and class name where it abstained)."""
    import pyarrow as pa

    n, ok = len(c), c.ok
    null = pa.array(~ok)
    withheld = ~ok
    withheld[ok] = c.withheld()

    def full(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros(n, dtype)
        out[ok] = values
        return out

    def lists(values: np.ndarray, value_type):
        width = values.shape[1] if values.ndim == 2 else 0
        offsets = np.concatenate([[0], np.cumsum(np.where(ok, width, 0))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), value_type), mask=null)

    labels = pa.array(full(c.label, np.int32), pa.int32(), mask=withheld)
    names = pa.array(np.array(c.class_names, dtype=object)[full(c.label, np.int32)], pa.string(), mask=withheld)
    ids = c.input_id.arrow() if hasattr(c.input_id, "arrow") else pa.array(list(c.input_id), pa.string())
    columns = [pa.array(c.index, pa.int64()), ids,
               labels, names,
               lists(c.probabilities, pa.float32()), lists(c.prototype_ids, pa.int32()),
               lists(c.prototype_distances, pa.float32()), lists(c.prototype_similarities, pa.float32()),
               lists(c.prototype_contributions, pa.float32()), *domain_columns(c, full),
               pa.array(full(c.withheld(), bool), pa.bool_(), mask=~ok),
               pa.nulls(n, pa.int32()) if c.true_label is None else pa.array(c.true_label, pa.int32(),
                                                                               mask=c.true_label < 0),
               pa.nulls(n, pa.string()) if c.picture is None else pa.array(c.picture, pa.string()),
               pa.repeat(pa.scalar(c.model_name), n),
               pa.repeat(pa.scalar(c.model_version), n), pa.array(c.error, pa.string())]
    return pa.Table.from_arrays(columns, schema=row_schema())


def domain_columns(c: Columns, full) -> list:
    """in_domain and typicality as Arrow columns: null on failed rows and without calibration."""
    import pyarrow as pa

    if c.in_domain is None:
        return [pa.nulls(len(c), pa.bool_()), pa.nulls(len(c), pa.float32())]
    return [pa.array(full(c.in_domain, bool), pa.bool_(), mask=~c.ok),
            pa.array(full(c.typicality, np.float32), pa.float32(), mask=~c.ok)]


class ParquetAssembly:
    """The Parquet output, written in chunk order into `path` as chunks become available: row groups
    of up to PARQUET_GROUP_CHUNKS chunks. Dictionary encoding only for the repetitive strings and
    statistics only for the integer keys: pyarrow's defaults (both on every column) spend time on
    the float lists that neither encoding nor statistics help, and give a larger file."""

    def __init__(self, path: Path, plan: dict, chunks: int, read_rows: ReadRows, done: set[int]):
        import pyarrow.parquet as pq

        self.path, self.chunks, self.read_rows = Path(path), chunks, read_rows
        self.done, self.next, self.group = set(done), 0, []
        self.tables: dict = {}  # committed chunks' rows handed over in memory, until written
        self.schema = row_schema(plan)
        self.file = open(self.path, "wb")
        self.writer = pq.ParquetWriter(self.file, self.schema,
                                       use_dictionary=["class_name", "model_name", "model_version", "error"],
                                       write_statistics=["index", "label"])
        self._drain()

    def add(self, k: int, table=None) -> None:
        """Chunk k is committed; `table`: its rows, when the caller has them in memory."""
        self.done.add(k)
        if table is not None:
            self.tables[k] = table
        self._drain()

    def complete(self) -> bool:
        return self.next == self.chunks

    def close(self) -> Path:
        """Write what is left, close and fsync the file; returns its path (the caller renames it)."""
        self._write_group()
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.file.close()
        self.path.unlink(missing_ok=True)

    def _drain(self) -> None:
        while self.next in self.done:  # chunks in order, each once: the prefix that is complete
            table = self.tables.pop(self.next, None)
            self.group.append(table if table is not None else self.read_rows(self.next))
            self.next += 1
            if len(self.group) == PARQUET_GROUP_CHUNKS:
                self._write_group()

    def _write_group(self) -> None:
        import pyarrow as pa

        if self.group:
            self.writer.write_table(pa.concat_tables(self.group).replace_schema_metadata(self.schema.metadata))
            self.group = []


def write_jsonl(path: Path, chunks: int, read_rows: ReadRows) -> None:
    """Every chunk's rows, in chunk order, one JSON object a line; fsynced (the caller renames the file)."""
    with open(path, "w") as f:
        for k in range(chunks):
            for row in read_rows(k).to_pylist():
                f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
