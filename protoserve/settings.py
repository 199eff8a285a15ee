"""The `PROTOSERVE_*` environment variables as one typed, frozen `Settings`: the only module that reads them.

Each field is one variable (`bundle` is PROTOSERVE_BUNDLE) with its type, default and meaning;
docs/settings.md lists them all. `settings()` parses the process's environment once for each set of
PROTOSERVE_* values it sees, so a value set before the service starts or a model loads is the one
used, and a bad value is refused with one line naming the variable. `environ(...)` writes settings
for a child process (`bentoml serve`, the worker) under their variable names.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protoserve.errors import ProtoserveError

PREFIX = "PROTOSERVE_"
DEVICES = ("auto", "cuda", "cpu")
DATABASE_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ProtoserveError):
    """A PROTOSERVE_* variable whose value cannot be used."""


def _text(value: str) -> str:
    return value


def _flag(value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ValueError(f"say 1 or 0 (or true / false), not {value!r}")


def _number(kind: type, minimum: float) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"not {'an integer' if kind is int else 'a number'}: {value!r}") from None
        if number < minimum:
            raise ValueError(f"{value} is below the least allowed value, {minimum}")
        return number

    return parse


def _device(value: str) -> str:
    if value not in DEVICES:
        raise ValueError(f"{value!r} is not one of {', '.join(DEVICES)}")
    return value


def _versions_url(value: str) -> str:
    """A folder, or s3://bucket[/prefix] (the bucket named: the prefix may be empty)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value  # a folder
    if scheme != "s3":
        raise ValueError(f"{value!r}: say a folder or s3://bucket/prefix ({scheme}:// is not supported)")
    if not rest.split("/", 1)[0]:
        raise ValueError(f"{value!r}: no bucket named (s3://bucket/prefix)")
    return value


def _database_url(value: str) -> str:
    if not value.startswith(DATABASE_SCHEMES):
        raise ValueError(f"{value.split('://')[0]!r} is not a database URL: say sqlite:///PATH or postgresql://...")
    return value


def _setting(default, parse: Callable[[str], object], meaning: str, **options):
    """A field read from its variable with `parse`; `meaning` documents it in one line."""
    return field(default=default, metadata={"parse": parse, "meaning": meaning}, **options)


@dataclass(frozen=True)
class Settings:
    """Every PROTOSERVE_* variable, parsed; an unset (or empty) variable keeps its default."""

    # What the service serves
    bundle: Path | None = _setting(None, Path, "bundle directory to serve (else PROTOSERVE_MODEL_TAG, else "
                                   "the shipped model)")
    model_tag: str | None = _setting(None, _text, "name:version of a bundle in the BentoML model store "
                                     "(`protoserve import`)")
    registry: Path | None = _setting(None, Path, "registry directory: serve its active version and follow it; "
                                     "mounts the review API and page at /review")
    registry_db: str | None = _setting(None, _database_url, "the registry's database: sqlite:///PATH or "
                                       "postgresql://USER:PASSWORD@HOST:PORT/DB (default: registry.sqlite in the "
                                       "registry directory)", repr=False)
    poll_seconds: float = _setting(0.5, _number(float, 0.01), "seconds between two reads of the registry's "
                                   "generation counter (registry mode)")
    prefetch_versions: int = _setting(3, _number(int, 0), "s3:// versions: how many of the newest never-active "
                                      "versions a replica downloads before they are promoted (besides the "
                                      "rollback target; 0: only the rollback target)")
    # Where versions live (registry mode): registry/objects.py
    versions_url: str | None = _setting(None, _versions_url, "where the registry keeps its versions' bundles and "
                                        "checkpoints: a folder, or s3://bucket/prefix (default: versions/ in "
                                        "the registry directory)")
    s3_endpoint_url: str | None = _setting(None, _text, "the S3 endpoint for s3:// versions and score's s3:// "
                                           "inputs and outputs (any S3-compatible "
                                           "store; default: boto3's, which honours AWS_ENDPOINT_URL_S3)")
    cache_dir: Path = _setting(Path.home() / ".cache" / "protoserve" / "versions", Path, "where a replica keeps "
                               "the versions it downloaded from s3:// (content-addressed, verified before loading), "
                               "and protoserve score the staging of its s3:// jobs and inputs")
    # How a model runs
    device: str = _setting("auto", _device, "ONNX Runtime device: auto (CUDA when a session gets it), cuda or cpu")
    threads: int = _setting(1, _number(int, 0), "ONNX Runtime intra-op threads per session (0: its own default)")
    # The BentoML service
    workers: int = _setting(2, _number(int, 1), "API worker processes")
    max_batch_size: int | None = _setting(None, _number(int, 1), "adaptive batching: most images in one "
                                          "session run (default: the per-request image limit)")
    max_latency_ms: int = _setting(2000, _number(int, 1), "adaptive batching: the wait past which a request "
                                   "is answered 503 (overloaded)")
    inline_max_size: int = _setting(8, _number(int, 0), "/predict calls of up to this many images are merged "
                                    "and run on the event loop; larger ones go through BentoML's batching")
    access_log: bool = _setting(False, _flag, "BentoML's access log (a line per request)")
    trace_image_routes: bool = _setting(False, _flag, "OpenTelemetry spans on /predict and /explain (BentoML's "
                                        "API layer then answers them, not the request gate)")
    abstain: bool = _setting(False, _flag, "every out-of-domain answer abstains unless the request says "
                             '"abstain": false')
    admin_key: str | None = _setting(None, _text, "the key that opens the changing review routes (Authorization: "
                                     "Bearer KEY); unset: they answer 403", repr=False)
    # The training side
    data_root: Path | None = _setting(None, Path, "folder of the training data (IDX files) when neither "
                                      "--data-root nor the config's data.root names one")
    job_lease_seconds: float = _setting(60.0, _number(float, 1), "a revision job's lease: its worker renews "
                                        "it while it works; past it, another worker may take the job over")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Parse the PROTOSERVE_* variables of `environ`; SettingsError names the first bad one."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(variable(f.name), "").strip()
            if not raw:
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as e:
                raise SettingsError(f"{variable(f.name)}: {e}") from None
        return cls(**values)


def variable(name: str) -> str:
    """The environment variable of a Settings field: "registry" -> "PROTOSERVE_REGISTRY"."""
    return PREFIX + name.upper()


def environ(**values: object) -> dict[str, str]:
    """Settings as environment variables for a child process: environ(workers=2) -> {"PROTOSERVE_WORKERS": "2"}."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"not settings: {', '.join(unknown)}")
    return {variable(name): _format(value) for name, value in values.items()}


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def settings() -> Settings:
    """This process's settings, parsed once for each set of PROTOSERVE_* values the environment holds."""
    return _parsed(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX))))


@functools.lru_cache(maxsize=8)
def _parsed(items: tuple[tuple[str, str], ...]) -> Settings:
    return Settings.from_env(dict(items))
