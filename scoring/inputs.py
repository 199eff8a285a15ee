"""What a batch job reads: folders of image files, IDX files, .npy/.npz arrays, Parquet image columns.

Every input becomes a source of `n` items, read by range without loading the whole file: records
are read with a seek (IDX and .npy, gzip or npz members included: forward seeks stream), Parquet one
row group at a time, folders one file at a time. The sources of a job are laid end to end; item
`i` of the job is the same input on every run, so a job is cut into fixed ranges (chunks) that can
be scored in any order and resumed.

An item is (input_id, value): value is picture bytes, one numpy record, or an InputError saying why
it could not be read (the job goes on; the row records it).

truth() gives the inputs' classes where the input says them: an IDX labels file beside an IDX images
file (`t10k-labels-idx1-ubyte.gz` beside `t10k-images-idx3-ubyte.gz`), or a folder's first-level
sub-folder named as one of the model's classes (the `folder` data set's layout); -1 elsewhere.

fingerprint() identifies the inputs as they are now (names, sizes, modification times, and a hash of
each file's first and last 64 KiB) so a resumed job notices a changed input.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from protoserve.errors import InputError, ProtoserveError
from protoserve.settings import settings
from scoring.bucket import Bucket, ObjectInfo, ObjectStoreError, ObjectUrl, is_remote

try:  # ISA-L's gzip: the same format, faster to decompress (gzipped IDX inputs); optional
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - a platform without its wheel
    _gzip = gzip

IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SAMPLE_BYTES = 64 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024  # an image file past this is refused unread (recorded as an error)


class InputsError(ProtoserveError):
    """An --input that cannot be read at all (missing, unknown format, no image column)."""


class RecordIds(Sequence):
    """The ids "<name>#<i>" of records lo..hi-1 of one file, made only when the rows are written
    (arrow(): straight into one Arrow column), never held as a list beside the records."""

    def __init__(self, name: str, lo: int, hi: int):
        self.name, self.lo, self.hi = name, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return f"{self.name}#{self.lo + i % len(self)}"

    def arrow(self):
        """The ids as an Arrow string array, built from numpy buffers (the ids' bytes: the name, "#" and
        the record's digits) without a Python string per id. (pyarrow.compute would join them too, but
        its first call in a process costs 0.2 s of CPU, more than a 70,000-image job's ids.)"""
        import pyarrow as pa

        n, prefix = len(self), np.frombuffer(f"{self.name}#".encode(), np.uint8)
        lengths = np.empty(n, np.int64)
        parts = []
        for lo, hi, width in _same_width_runs(self.lo, self.hi):  # fixed-width rows within a run
            powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
            chars = np.empty((hi - lo, len(prefix) + width), np.uint8)
            chars[:, :len(prefix)] = prefix
            chars[:, len(prefix):] = np.arange(lo, hi, dtype=np.int64)[:, None] // powers % 10 + ord("0")
            parts.append(chars.reshape(-1))
            lengths[lo - self.lo:hi - self.lo] = len(prefix) + width
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if offsets[-1] >= 2**31:  # past a string array's 32-bit offsets: one string at a time
            return pa.array([f"{self.name}#{i}" for i in range(self.lo, self.hi)], pa.string())
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))


def _same_width_runs(lo: int, hi: int) -> list[tuple[int, int, int]]:
    """[lo, hi) cut where the numbers gain a digit: (lo, hi, digits) of each run."""
    runs = []
    while lo < hi:
        width = len(str(lo))
        end = min(hi, 10 ** width)
        runs.append((lo, end, width))
        lo = end
    return runs


class RecordSource:
    """Fixed-size records after a header: IDX files and .npy arrays (plain, gzip, or inside an .npz)."""

    def __init__(self, name: str, opener, offset: int, shape: tuple[int, ...], dtype: np.dtype, n: int,
                 files: list[Path]):
        self.name, self.opener, self.offset = name, opener, offset
        self.shape, self.dtype, self.n, self.files = shape, dtype, n, files
        self.record_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._file = None
        self.labels_path: Path | None = None  # an IDX labels file of n records beside an IDX images file
        self._labels: np.ndarray | None = None

    def truth(self, lo: int, hi: int, class_names: list[str]) -> np.ndarray:
        """Classes of records lo..hi-1 from the labels file beside this one; -1 without one."""
        if self.labels_path is None:
            return np.full(hi - lo, -1, np.int64)
        if self._labels is None:
            with _open_maybe_gzip(self.labels_path) as f:
                f.seek(8)
                self._labels = np.frombuffer(f.read(self.n), np.uint8).astype(np.int64)
        labels = self._labels[lo:hi]
        return np.where(labels < len(class_names), labels, -1)

    def read(self, lo: int, hi: int) -> list[tuple[str, object]]:
        ids, block, missing = self.read_block(lo, hi)
        items: list[tuple[str, object]] = list(zip(ids[:len(block)], block, strict=True))
        return items + [(ids[i], InputError("corrupt_image", "file is truncated: record missing"))
                        for i in range(len(block), len(block) + missing)]

    def read_block(self, lo: int, hi: int) -> tuple[RecordIds, np.ndarray, int]:
        """Records lo..hi-1 as one array: (ids, records [m, ...], how many are missing past the end)."""
        if self._file is None:
            self._file = self.opener()
        self._file.seek(self.offset + lo * self.record_bytes)
        data = self._file.read((hi - lo) * self.record_bytes)
        whole = len(data) // self.record_bytes if self.record_bytes else hi - lo
        block = np.frombuffer(data[:whole * self.record_bytes], self.dtype).reshape(whole, *self.shape)
        block = block.astype(self.dtype.newbyteorder("="), copy=False)
        return RecordIds(self.name, lo, hi), block, hi - lo - whole

    def close(self) -> None:
        self._labels = None
        if self._file is not None:
            self._file.close()
            self._file = None


class FolderSource:
    """Every file under a folder (recursively, hidden ones left out), in sorted path order."""

    def __init__(self, root: Path, name: str, exclude: tuple[Path, ...] = ()):
        self.root, self.name = root, name
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
        if exclude:
            # The job's own output and chunks, should they be written inside an input folder.
            skip = [e.resolve() for e in exclude]
            files = [p for p in files if not any(p.resolve().is_relative_to(e) for e in skip)]
        self.paths = files
        self.n = len(files)
        self.files = files

    def truth(self, lo: int, hi: int, class_names: list[str]) -> np.ndarray:
        """Classes of files lo..hi-1 from their first-level sub-folder's name; -1 where it names no class."""
        index = {name: i for i, name in enumerate(class_names)}
        return np.array([index.get(p.relative_to(self.root).parts[0], -1) if len(p.relative_to(self.root).parts) > 1
                         else -1 for p in self.paths[lo:hi]], np.int64)

    def read(self, lo: int, hi: int) -> list[tuple[str, object]]:
        items: list[tuple[str, object]] = []
        for p in self.paths[lo:hi]:
            input_id = os.path.join(self.name, p.relative_to(self.root).as_posix())
            try:
                if p.stat().st_size > MAX_FILE_BYTES:
                    raise InputError("image_too_large", f"file of {p.stat().st_size} bytes is over the "
                                     f"{MAX_FILE_BYTES} byte limit")
                items.append((input_id, p.read_bytes()))
            except OSError as e:
                items.append((input_id, InputError("not_an_image", f"cannot read the file ({e.strerror})")))
            except InputError as e:
                items.append((input_id, e))
        return items

    def close(self) -> None:
        pass


class ObjectFolderSource:
    """Every object under an s3://bucket/prefix (hidden names left out), in key order: a folder in a bucket.
    Each chunk's objects are read PARALLEL at a time (one GET each)."""

    def __init__(self, url: ObjectUrl, name: str, objects: list[ObjectInfo], bucket: Bucket):
        self.url, self.name, self.bucket = url, name, bucket
        self.objects, self.n, self.files = objects, len(objects), []
        self.relative = [o.key[len(url.key):].lstrip("/") if url.key else o.key for o in objects]

    def fingerprint(self) -> str:
        """Keys, sizes and ETags: a replaced object has another ETag."""
        return "".join(f"s3://{self.url.bucket}/{o.key}|{o.size}|{o.etag}\n" for o in self.objects)

    def truth(self, lo: int, hi: int, class_names: list[str]) -> np.ndarray:
        """Classes of objects lo..hi-1 from their first-level "sub-folder" under the prefix; -1 elsewhere."""
        index = {name: i for i, name in enumerate(class_names)}
        return np.array([index.get(r.split("/")[0], -1) if "/" in r else -1 for r in self.relative[lo:hi]],
                        np.int64)

    def read(self, lo: int, hi: int) -> list[tuple[str, object]]:
        items: list[tuple[str, object]] = []
        objects, ids = self.objects[lo:hi], [f"{self.name.rstrip('/')}/{r}" for r in self.relative[lo:hi]]
        small = [o.key for o in objects if o.size <= MAX_FILE_BYTES]
        values = dict(zip(small, self.bucket.read_many(small), strict=True))
        for input_id, o in zip(ids, objects, strict=True):
            value = values.get(o.key)
            if value is None:
                items.append((input_id, InputError("image_too_large", f"object of {o.size} bytes is over the "
                                                   f"{MAX_FILE_BYTES} byte limit")))
            elif isinstance(value, ObjectStoreError):
                items.append((input_id, InputError("not_an_image", f"cannot read the object ({value})")))
            else:
                items.append((input_id, value))
        return items

    def close(self) -> None:
        pass


class ParquetSource:
    """One column of picture bytes in a Parquet file (binary, or a struct with a "bytes" field)."""

    def __init__(self, path: Path, name: str, column: str | None):
        import pyarrow.parquet as pq

        self.path, self.name, self.files = path, name, [path]
        self.file = pq.ParquetFile(path)
        self.column, self.struct = _image_column(self.file.schema_arrow, column, name)
        meta = self.file.metadata
        self.n = meta.num_rows
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cached: tuple[int, list] | None = None

    def truth(self, lo: int, hi: int, class_names: list[str]) -> np.ndarray:
        return np.full(hi - lo, -1, np.int64)

    def read(self, lo: int, hi: int) -> list[tuple[str, object]]:
        items: list[tuple[str, object]] = []
        i = lo
        while i < hi:
            g = int(np.searchsorted(self.group_starts, i, side="right") - 1)
            values = self._group(g)
            end = min(hi, int(self.group_starts[g + 1]))
            for j in range(i, end):
                value = values[j - int(self.group_starts[g])]
                if isinstance(value, dict):
                    value = value.get("bytes")
                input_id = f"{self.name}#{j}"
                if value is None:
                    items.append((input_id, InputError("not_an_image", "no image bytes in this row (null)")))
                else:
                    items.append((input_id, value))
            i = end
        return items

    def _group(self, g: int) -> list:
        if self._cached is None or self._cached[0] != g:
            table = self.file.read_row_group(g, columns=[self.column])
            self._cached = (g, table.column(0).to_pylist())
        return self._cached[1]

    def close(self) -> None:
        self._cached = None
        self.file.close()


def _image_column(schema, wanted: str | None, name: str) -> tuple[str, bool]:
    import pyarrow as pa

    def is_bytes(t):
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    def is_struct_image(t):
        return pa.types.is_struct(t) and any(f.name == "bytes" and is_bytes(f.type) for f in t)

    if wanted is not None:
        if wanted not in schema.names:
            raise InputsError(f"{name}: no column {wanted!r} (columns: {', '.join(schema.names)})")
        t = schema.field(wanted).type
        if not (is_bytes(t) or is_struct_image(t)):
            raise InputsError(f"{name}: column {wanted!r} holds {t}, not image bytes")
        return wanted, is_struct_image(t)
    for f in schema:
        if is_bytes(f.type) or is_struct_image(f.type):
            return f.name, is_struct_image(f.type)
    raise InputsError(f"{name}: no column of image bytes (binary, or a struct with a 'bytes' field); "
                      f"columns: {', '.join(schema.names)}")


@dataclass
class Inputs:
    """The sources of a job laid end to end: item i of the job, whatever file it is in."""

    sources: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [s.n for s in self.sources])

    @property
    def n(self) -> int:
        return int(self.starts[-1])

    def read_values(self, lo: int, hi: int) -> tuple[Sequence[str], list[object] | np.ndarray]:
        """(ids, values) of items lo..hi-1: values is one array when they are whole records of one file."""
        k = int(np.searchsorted(self.starts, lo, side="right") - 1)
        source = self.sources[k] if k < len(self.sources) else None
        if isinstance(source, RecordSource) and hi <= int(self.starts[k + 1]):
            ids, block, missing = source.read_block(lo - int(self.starts[k]), hi - int(self.starts[k]))
            if not missing:
                return ids, block
        items = self.read(lo, hi)
        return [i for i, _ in items], [v for _, v in items]

    def truth(self, lo: int, hi: int, class_names: list[str]) -> np.ndarray:
        """int64 [hi - lo]: the classes of items lo..hi-1 where the inputs say them, else -1."""
        parts = []
        for k, source in enumerate(self.sources):
            s_lo, s_hi = max(lo, int(self.starts[k])), min(hi, int(self.starts[k + 1]))
            if s_lo < s_hi:
                parts.append(source.truth(s_lo - int(self.starts[k]), s_hi - int(self.starts[k]), class_names))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def read(self, lo: int, hi: int) -> list[tuple[str, object]]:
        """Items lo..hi-1 of the job, in order."""
        items: list[tuple[str, object]] = []
        for k, source in enumerate(self.sources):
            s_lo, s_hi = max(lo, int(self.starts[k])), min(hi, int(self.starts[k + 1]))
            if s_lo < s_hi:
                items += source.read(s_lo - int(self.starts[k]), s_hi - int(self.starts[k]))
        return items

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{type(source).__name__}:{source.name}:{source.n}\n".encode())
            # Folders: names, sizes and times (reading every picture twice would cost a second pass).
            sample = not isinstance(source, FolderSource)
            if hasattr(source, "fingerprint"):  # inputs in an object store
                digest.update(source.fingerprint().encode())
            for path in source.files:
                digest.update(_file_fingerprint(path, sample).encode())
        return digest.hexdigest()

    def close(self) -> None:
        for source in self.sources:
            source.close()


def open_inputs(paths: list[str], image_column: str | None = None, exclude: tuple[Path | str, ...] = ()) -> Inputs:
    """--input values -> Inputs; InputsError names an input that cannot be read at all. `exclude`: folders,
    files and s3:// URLs (with every key under them) that are never inputs (the job's own output)."""
    sources = []
    for name in paths:
        if is_remote(name):
            sources += _object_sources(name, image_column, tuple(str(e) for e in exclude if is_remote(str(e))))
            continue
        path = Path(name)
        exclude_paths = tuple(e for e in exclude if isinstance(e, Path))
        if path.is_dir():
            sources.append(FolderSource(path, name, exclude_paths))
        elif not path.is_file():
            raise InputsError(f"{name}: no such file or folder")
        else:
            sources += _file_sources(path, name, image_column)
    return Inputs(sources)


def _file_sources(path: Path, name: str, image_column: str | None) -> list:
    if _suffix(path) == ".npy":
        return [_npy_source(path, name)]
    if _suffix(path) == ".npz":
        return _npz_sources(path, name)
    if _suffix(path) in (".parquet", ".pq"):
        return [ParquetSource(path, name, image_column)]
    if _is_idx(path):
        return [_idx_source(path, name)]
    raise InputsError(f"{name}: not a folder, IDX file, .npy/.npz array or Parquet file")


def _object_sources(name: str, image_column: str | None, exclude: tuple[str, ...]) -> list:
    """An s3:// --input: the URL of one object (an IDX, .npy/.npz or Parquet file: downloaded once into the
    cache, by its ETag, and read like a file) or a prefix (a folder of image objects, read object by object)."""
    url = ObjectUrl.parse(name)
    bucket = Bucket(url.bucket, "--input")
    listed = bucket.list(url.key)
    single = [o for o in listed if o.key == url.key and url.key]
    if single and not name.endswith("/"):
        return _object_file_sources(bucket, url, single[0], name, image_column)
    prefix = f"{url.key}/" if url.key else ""
    skip = [ObjectUrl.parse(e).key for e in exclude if ObjectUrl.parse(e).bucket == url.bucket]
    objects = [o for o in listed if o.key.startswith(prefix) and not _hidden(Path(o.key[len(prefix):]))
               and not any(o.key == s or o.key.startswith(s + ".") for s in skip)]  # the output, <output>.job/
    if not objects:
        raise InputsError(f"{name}: no objects under this prefix in bucket {url.bucket!r}")
    return [ObjectFolderSource(url, name, objects, bucket)]


def _object_file_sources(bucket: Bucket, url: ObjectUrl, info: ObjectInfo, name: str,
                         image_column: str | None) -> list:
    """One object holding many inputs, read from the local cache (downloaded when its ETag is new to it);
    an IDX images object brings the IDX labels object beside it, as a file does (true_label)."""
    objects = [info] + _idx_labels_objects(bucket, info.key)
    fingerprint = "".join(f"s3://{url.bucket}/{o.key}|{o.size}|{o.etag}\n" for o in objects)
    # <cache>/scoring/inputs/<sha256 of the objects' URLs, sizes and ETags>/<their names>
    folder = settings().cache_dir / "scoring" / "inputs" / hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
    folder.mkdir(parents=True, exist_ok=True)
    for o in objects:
        if not (folder / PurePosixPath(o.key).name).is_file():
            bucket.download(o.key, folder / PurePosixPath(o.key).name)
    sources = _file_sources(folder / PurePosixPath(info.key).name, name, image_column)
    for source in sources:  # the objects' identity, not the cache path (other hosts cache them elsewhere)
        source.files = []
        source.fingerprint = lambda: fingerprint
    return sources


def _idx_labels_objects(bucket: Bucket, key: str) -> list[ObjectInfo]:
    """The IDX labels object beside an IDX images object (MNIST's names, as _idx_labels), if there is one."""
    if "-images-idx3-" not in key:
        return []
    stem = key.replace("-images-idx3-", "-labels-idx1-").removesuffix(".gz")
    return [o for o in bucket.list(stem) if o.key in (stem, stem + ".gz")][:1]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return os.path.splitext(name)[1]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return _gzip.open(path, "rb") if gz else open(path, "rb")


def _is_idx(path: Path) -> bool:
    try:
        with _open_maybe_gzip(path) as f:
            head = f.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES and 1 <= head[3] <= 4


def _idx_source(path: Path, name: str) -> RecordSource:
    with _open_maybe_gzip(path) as f:
        head = f.read(4)
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    source = RecordSource(name, lambda: _open_maybe_gzip(path), 4 + 4 * ndim, tuple(dims[1:]), IDX_TYPES[head[2]],
                          dims[0], [path])
    source.labels_path = _idx_labels(path, dims[0])
    if source.labels_path is not None:
        source.files = [path, source.labels_path]  # a changed labels file changes the job's true_label column
    return source


def _idx_labels(images: Path, n: int) -> Path | None:
    """The IDX labels file beside an IDX images file (MNIST's names: -images-idx3- -> -labels-idx1-,
    gzipped or not), when it holds n uint8 labels; None otherwise."""
    if "-images-idx3-" not in images.name:
        return None
    stem = images.name.replace("-images-idx3-", "-labels-idx1-").removesuffix(".gz")
    for candidate in (images.with_name(stem), images.with_name(stem + ".gz")):
        try:
            with _open_maybe_gzip(candidate) as f:
                head = f.read(8)
        except (OSError, EOFError):
            continue
        if len(head) == 8 and head[:4] == b"\0\0\x08\x01" and struct.unpack(">I", head[4:])[0] == n:
            return candidate
    return None


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"format version {version} (protoserve reads 1.0 and 2.0)")
        shape, fortran, dtype = read_header[version](f)
    except ValueError as e:
        raise InputsError(f"{name}: not a readable .npy array ({e})") from None
    if fortran and len(shape) > 1:
        raise InputsError(f"{name}: Fortran-ordered array; save it in C order (np.ascontiguousarray)")
    if dtype.hasobject:
        raise InputsError(f"{name}: holds Python objects; protoserve reads numeric arrays only")
    return shape, dtype


def _npy_source(path: Path, name: str) -> RecordSource:
    with open(path, "rb") as f:
        shape, dtype = _npy_header(f, name)
        offset = f.tell()
    if len(shape) < 2:
        raise InputsError(f"{name}: array of shape {shape} is not a stack of images")
    return RecordSource(name, lambda: open(path, "rb"), offset, tuple(shape[1:]), dtype, shape[0], [path])


def _npz_sources(path: Path, name: str) -> list[RecordSource]:
    """One source per array of 3 or more dimensions in the archive (labels and the like are skipped)."""
    sources = []
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if m.endswith(".npy")]
            for member in members:
                with archive.open(member) as f:
                    shape, dtype = _npy_header(f, f"{name}:{member}")
                    offset = f.tell()
                if len(shape) >= 3:
                    sources.append(RecordSource(f"{name}:{member[:-4]}", _member_opener(path, member), offset,
                                                tuple(shape[1:]), dtype, shape[0], [path]))
    except zipfile.BadZipFile as e:
        raise InputsError(f"{name}: not a readable .npz archive ({e})") from None
    if not sources:
        raise InputsError(f"{name}: holds no array of images (3 or more dimensions)")
    return sources


def _member_opener(path: Path, member: str):
    def opener():
        archive = zipfile.ZipFile(path)
        f = archive.open(member)
        closing = f.close

        def close():
            closing()
            archive.close()
        f.close = close
        return f
    return opener


def _file_fingerprint(path: Path, sample: bool = True) -> str:
    stat = path.stat()
    digest = hashlib.sha256()
    if not sample:
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n"
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if stat.st_size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{digest.hexdigest()}\n"
