"""Every revision the review page offers, through the worker: both families x mask / prune / revise x
rounds 1 and 3 x frozen / trained encoder, each ending with a verified candidate whose lineage names
its verdicts, its mode and the rounds that ran."""

from __future__ import annotations

import functools

import pytest
from tiny_configs import TINY_QUALITY_OPTIONS

from bundle.runtime import verify_bundle
from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict
from worker.loop import run_worker

REJECTED = (1, 4)
TRAIN_SUBSET = 200  # of the tiny models' training images: a round of training takes a fraction of a second
FAMILIES = ("prototypedl", "protopnet")
# Mask and prune run one round without training: rounds and the encoder change nothing there, so one
# case each checks that a request for more rounds is recorded as the one round that ran.
OPTIONS = [("revise", rounds, frozen) for rounds in (1, 3) for frozen in (True, False)] + \
          [(mode, rounds, frozen) for mode in ("mask", "prune") for rounds, frozen in ((1, True), (3, False))]


@pytest.fixture(scope="module", autouse=True)
def small_quality_report():
    """The candidates' explanation-quality report on the tiny bundles' small sample (tiny_configs.py): the
    report is not what this matrix tests, and at full size it is most of a job's time. Parity still runs
    on the whole test set, as in every job."""
    import revision.revise
    from export.quality.report import QualityOptions

    export = revision.revise.export_bundle
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(revision.revise, "export_bundle", functools.partial(
            export, quality=QualityOptions(**TINY_QUALITY_OPTIONS)))
        yield


@pytest.fixture(scope="module")
def registries(tiny_bundle, tiny_checkpoint, tiny_protopnet_bundle, tiny_protopnet_checkpoint,
               tmp_path_factory) -> dict:
    """One registry per family, its tiny model registered as 0.1.0 (shared by every case)."""
    from registry.versions import Registry

    made = {}
    for family, bundle, checkpoint in (("prototypedl", tiny_bundle, tiny_checkpoint),
                                       ("protopnet", tiny_protopnet_bundle, tiny_protopnet_checkpoint)):
        registry = Registry(tmp_path_factory.mktemp(f"matrix_{family}") / "registry")
        registry.register(bundle, checkpoint)
        registry.promote("0.1.0")
        made[family] = registry
    return made


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("mode", "rounds", "frozen"), OPTIONS,
                         ids=[f"{m}-{r}rounds-{'frozen' if f else 'trained'}" for m, r, f in OPTIONS])
def test_every_option_lands_a_verified_candidate(registries, mnist_root, family, mode, rounds, frozen):
    registry = registries[family]
    settings = RevisionSettings(mode=mode, rounds=rounds, epochs_per_round=1, freeze_encoder=frozen,
                                train_subset=TRAIN_SUBSET, last_layer_epochs=1)
    # Each round that runs gets its rejections (a round that rejects nothing ends the revision); prune
    # takes no verdicts: it chooses its own.
    judged = [] if mode == "prune" else [(j, r) for r in range(1, settings.rounds_run + 1) for j in REJECTED]
    given = [registry.store.add_verdict("0.1.0", verdict(j, "reject", r, "ada"))["id"] for j, r in judged]
    job = registry.store.add_job("0.1.0", settings)
    assert run_worker(registry, str(mnist_root), once=True, lease=30, log=lambda s: None) == 1
    done = registry.store.job(job["id"])
    assert done["status"] == "done", done["error"]
    candidate = registry.store.version(done["result"]["candidate"])
    assert candidate.status == "candidate" and candidate.parent == "0.1.0"
    verify_bundle(candidate.bundle)
    lineage = candidate.lineage
    assert lineage["mode"] == mode and lineage["rounds"] == settings.rounds_run
    assert lineage["config"]["rounds"] == rounds and lineage["config"]["freeze_encoder"] == frozen
    assert registry.store.job_settings(job["id"]).verdict_ids == given
    assert sorted((v["prototype_id"], v["round"]) for v in lineage["verdicts"]) == sorted(judged)
    if mode == "mask":
        assert set(REJECTED) <= set(lineage["masked"])
    if mode == "revise":
        assert sorted((a["prototype_id"], a["round"]) for a in lineage["antitypes"]) == sorted(judged)
