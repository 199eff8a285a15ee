"""The PROTOSERVE_* settings: parsing, refusals that name the variable, and docs/settings.md in step with them."""

import dataclasses
import re
from pathlib import Path

import pytest

from cli.main import main
from protoserve.settings import Settings, SettingsError, environ, settings, variable

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_the_table_lists_every_setting_and_nothing_else():
    documented = re.findall(r"^\| `(PROTOSERVE_[A-Z0-9_]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "a variable is listed twice"
    assert sorted(documented) == sorted(variable(f.name) for f in dataclasses.fields(Settings))


def test_unset_and_empty_variables_keep_their_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"PROTOSERVE_WORKERS": "", "PROTOSERVE_BUNDLE": " "}) == Settings()
    s = Settings()
    assert (s.workers, s.device, s.threads, s.poll_seconds, s.abstain, s.bundle) == (2, "auto", 1, 0.5, False, None)


def test_values_are_parsed_to_their_types():
    s = Settings.from_env({"PROTOSERVE_WORKERS": "3", "PROTOSERVE_POLL_SECONDS": "0.25", "PROTOSERVE_ABSTAIN": "1",
                           "PROTOSERVE_ACCESS_LOG": "false", "PROTOSERVE_REGISTRY": "/tmp/reg",
                           "PROTOSERVE_DEVICE": "cpu", "OTHER": "ignored"})
    assert (s.workers, s.poll_seconds, s.abstain, s.access_log) == (3, 0.25, True, False)
    assert s.registry == Path("/tmp/reg") and s.device == "cpu"


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PROTOSERVE_WORKERS", "abc", "not an integer"),
    ("PROTOSERVE_WORKERS", "0", "least allowed"),
    ("PROTOSERVE_POLL_SECONDS", "soon", "not a number"),
    ("PROTOSERVE_ABSTAIN", "maybe", "1 or 0"),
    ("PROTOSERVE_DEVICE", "tpu", "auto, cuda, cpu"),
    ("PROTOSERVE_REGISTRY_DB", "mysql://u:pw@h/db", "sqlite:///PATH or postgresql://"),
])
def test_a_bad_value_is_refused_with_one_line_naming_the_variable(name, value, says):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({name: value})
    message = str(refused.value)
    assert message.startswith(f"{name}: ") and says in message and "\n" not in message


def test_settings_follow_the_environment_they_are_read_in(monkeypatch):
    monkeypatch.setenv("PROTOSERVE_WORKERS", "5")
    assert settings().workers == 5
    monkeypatch.setenv("PROTOSERVE_WORKERS", "1")
    assert settings().workers == 1
    assert settings() is settings()  # parsed once per environment


def test_environ_writes_settings_a_child_process_reads_back():
    written = environ(workers=3, abstain=True, registry=Path("/tmp/reg"))
    assert written == {"PROTOSERVE_WORKERS": "3", "PROTOSERVE_ABSTAIN": "1", "PROTOSERVE_REGISTRY": "/tmp/reg"}
    assert Settings.from_env(written) == Settings(workers=3, abstain=True, registry=Path("/tmp/reg"))
    with pytest.raises(TypeError, match="not settings: worker"):
        environ(worker=3)


def test_the_admin_key_is_never_shown():
    assert "s3cret" not in repr(Settings.from_env({"PROTOSERVE_ADMIN_KEY": "s3cret"}))


def test_serve_refuses_a_bad_setting_before_bentoml_starts(monkeypatch, capsys):
    monkeypatch.setenv("PROTOSERVE_MAX_LATENCY_MS", "abc")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "protoserve serve: error: PROTOSERVE_MAX_LATENCY_MS: not an integer: 'abc'"
