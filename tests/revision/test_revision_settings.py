"""RevisionSettings: one typed object, defaults written once, validation errors in one line, and the
registry's stored job parsed back into the object it was stored from."""

import pytest

from registry.revision_settings import QueuedRevision, RevisionSettings, RevisionSettingsError


def test_bad_settings_are_one_readable_line():
    cases = [({"rounds": 0}, "rounds must be >= 1"),
             ({"train_subset": 0}, "train subset 0: must be at least 1 training image"),
             ({"mode": "erase"}, "mode must be one of 'mask', 'prune' or 'revise', got 'erase'"),
             ({"max_accuracy_drop": 2.0}, "max_accuracy_drop must be <= 1.0"),
             ({"epochs": 3}, "epochs: Extra inputs are not permitted")]
    for values, message in cases:
        with pytest.raises(RevisionSettingsError) as e:
            RevisionSettings.of(**values)
        assert str(e.value) == message and "\n" not in str(e.value)


def test_settings_are_frozen_and_strict():
    settings = RevisionSettings()
    with pytest.raises(Exception, match="frozen"):
        settings.rounds = 3
    with pytest.raises(RevisionSettingsError, match="rounds"):
        RevisionSettings.of(rounds="3")  # no "3" for 3


def test_a_stored_job_parses_back_into_its_settings():
    settings = RevisionSettings(mode="mask", rounds=1, train_subset=200, auto_promote=True)
    stored = QueuedRevision(**settings.model_dump(), verdict_ids=[3, 4]).model_dump_json()
    job = QueuedRevision.model_validate_json(stored)
    assert job.settings() == settings and job.verdict_ids == [3, 4]


def test_a_job_stored_with_only_the_page_options_takes_the_defaults():
    stored = ('{"mode": "revise", "rounds": 1, "epochs_per_round": 1, "freeze_encoder": true, "train_subset": null, '
              '"auto_promote": false, "max_accuracy_drop": 0.01, "verdict_ids": [1]}')
    job = QueuedRevision.model_validate_json(stored)
    assert job.settings() == RevisionSettings(rounds=1, epochs_per_round=1)
