"""Verdict files: round trip, and every malformed line refused with its file and line number."""

import json

import pytest

from registry.verdicts import (
    VerdictError,
    append_verdicts,
    check_ids,
    read_verdicts,
    rejected_ids,
    verdict,
)


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    given = [verdict(39, "reject", 1, "ada", note="background"), verdict(2, "accept", 1, "simulated:box-off-object"),
             verdict(5, "unsure", 2, "ada", at="2026-12-01T14:20:00+00:00")]
    append_verdicts(path, given[:2])
    append_verdicts(path, given[2:])  # appending keeps what was there
    assert read_verdicts(path) == given
    assert json.loads(path.read_text().splitlines()[0]) == {
        "prototype_id": 39, "verdict": "reject", "round": 1, "source": "ada", "at": given[0].at, "note": "background"}


def test_latest_verdict_per_prototype_decides(tmp_path):
    vs = [verdict(1, "reject", 1, "ada"), verdict(1, "accept", 1, "ada"), verdict(3, "reject", 1, "ada"),
          verdict(4, "reject", 2, "ada")]
    assert rejected_ids(vs) == [3, 4]
    assert rejected_ids(vs, round=2) == [4]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prototype_id": 1, "verdict": "reject", "round": 1, "source": "a"}', "missing field(s) ['at']"),
    ('{"prototype_id": -1, "verdict": "reject", "round": 1, "source": "a", "at": "2026-12-01T00:00:00"}',
     "prototype_id must be an integer >= 0"),
    ('{"prototype_id": true, "verdict": "reject", "round": 1, "source": "a", "at": "2026-12-01T00:00:00"}',
     "prototype_id must be an integer"),
    ('{"prototype_id": 1, "verdict": "maybe", "round": 1, "source": "a", "at": "2026-12-01T00:00:00"}',
     "verdict must be one of"),
    ('{"prototype_id": 1, "verdict": "reject", "round": "1", "source": "a", "at": "2026-12-01T00:00:00"}',
     "round must be an integer"),
    ('{"prototype_id": 1, "verdict": "reject", "round": 1, "source": "", "at": "2026-12-01T00:00:00"}',
     "source must be a non-empty string"),
    ('{"prototype_id": 1, "verdict": "reject", "round": 1, "source": "a", "at": "yesterday"}',
     "at must be an ISO 8601 time"),
    ('{"prototype_id": 1, "verdict": "reject", "round": 1, "source": "a", "at": "2026-12-01T00:00:00", "x": 1}',
     "unknown field(s) ['x']"),
])
def test_malformed_line_is_refused_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "v.jsonl"
    good = verdict(0, "accept", 1, "ada").to_json()
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(VerdictError) as e:
        read_verdicts(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert problem in str(e.value)


def test_missing_file_and_unknown_ids_are_refused(tmp_path):
    with pytest.raises(VerdictError, match="verdict file not found"):
        read_verdicts(tmp_path / "none.jsonl")
    with pytest.raises(VerdictError, match=r"prototype id\(s\) \[50\] do not exist"):
        check_ids([verdict(50, "reject", 1, "ada")], 50, "v.jsonl")
