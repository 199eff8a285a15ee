"""Verdicts: a user's judgement of one prototype, keyed by its stable id, stored as JSON lines.

One verdict is one JSON object on one line:
    {"prototype_id": 39, "verdict": "reject", "round": 1, "source": "ada",
     "at": "2026-12-01T14:20:00+00:00", "note": "background"}
`verdict` is "reject" | "accept" | "unsure"; `source` a person's name or "simulated:<rule>";
`at` an ISO 8601 time; `note` optional (null or absent). Pure Python: the CLI, the revision
worker (torch) and the service (no torch) all read and write verdict files through this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from protoserve.errors import ProtoserveError

VERDICTS = ("reject", "accept", "unsure")
FIELDS = ("prototype_id", "verdict", "round", "source", "at", "note")


class VerdictError(ProtoserveError):
    """A verdict file or line that can't be used: "<file>:<line>: <problem>"."""


@dataclass(frozen=True)
class Verdict:
    prototype_id: int
    verdict: str
    round: int
    source: str
    at: str
    note: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def verdict(prototype_id: int, kind: str, round: int, source: str, note: str | None = None,
            at: str | None = None) -> Verdict:
    """A checked Verdict (the same checks a file line gets); `at` defaults to now."""
    return parse_verdict({"prototype_id": prototype_id, "verdict": kind, "round": round, "source": source,
                          "at": at or now(), "note": note}, "verdict")


def parse_verdict(raw, where: str) -> Verdict:
    """One decoded JSON value -> Verdict, or VerdictError naming `where` and the problem."""
    if not isinstance(raw, dict):
        raise VerdictError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise VerdictError(f"{where}: unknown field(s) {unknown}; a verdict has {list(FIELDS)}")
    missing = [f for f in FIELDS[:5] if f not in raw]
    if missing:
        raise VerdictError(f"{where}: missing field(s) {missing}")
    pid, kind, rnd, source, at, note = (raw.get(f) for f in FIELDS)
    if not _is_int(pid) or pid < 0:
        raise VerdictError(f"{where}: prototype_id must be an integer >= 0, got {pid!r}")
    if kind not in VERDICTS:
        raise VerdictError(f"{where}: verdict must be one of {list(VERDICTS)}, got {kind!r}")
    if not _is_int(rnd) or rnd < 0:
        raise VerdictError(f"{where}: round must be an integer >= 0, got {rnd!r}")
    if not isinstance(source, str) or not source.strip():
        raise VerdictError(f"{where}: source must be a non-empty string (a name or 'simulated:<rule>')")
    if not isinstance(at, str) or not _is_iso_time(at):
        raise VerdictError(f"{where}: at must be an ISO 8601 time, got {at!r}")
    if note is not None and not isinstance(note, str):
        raise VerdictError(f"{where}: note must be a string or null, got {type(note).__name__}")
    return Verdict(prototype_id=pid, verdict=kind, round=rnd, source=source, at=at, note=note)


def read_verdicts(path: str | Path) -> list[Verdict]:
    """Every verdict in a JSON-lines file, in file order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise VerdictError(f"{path}: verdict file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VerdictError(f"{path}: not readable as UTF-8 text ({e})") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise VerdictError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        out.append(parse_verdict(raw, f"{path}:{number}"))
    return out


def append_verdicts(path: str | Path, verdicts: list[Verdict]) -> None:
    """Append verdicts as lines, flushed and synced at once (an interrupted session keeps them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for v in verdicts:
            f.write(v.to_json() + "\n")
        f.flush()


def latest_by_prototype(verdicts: list[Verdict]) -> dict[int, Verdict]:
    """The last verdict given to each prototype (a later line overrides an earlier one)."""
    return {v.prototype_id: v for v in verdicts}


def rejected_ids(verdicts: list[Verdict], round: int | None = None) -> list[int]:
    """Prototype ids whose latest verdict (of `round`, if given) is "reject", ascending."""
    chosen = [v for v in verdicts if round is None or v.round == round]
    return sorted(pid for pid, v in latest_by_prototype(chosen).items() if v.verdict == "reject")


def check_ids(verdicts: list[Verdict], n_prototypes: int, where: str) -> None:
    """Refuse verdicts naming a prototype id the model does not have."""
    bad = sorted({v.prototype_id for v in verdicts if v.prototype_id >= n_prototypes})
    if bad:
        raise VerdictError(f"{where}: prototype id(s) {bad[:5]} do not exist (the model has ids 0..{n_prototypes - 1})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_iso_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True
