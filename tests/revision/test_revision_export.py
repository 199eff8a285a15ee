"""A masked prototype has no influence, in PyTorch and in the exported ONNX graph; a revised
bundle records its lineage and keeps every prototype id."""

import numpy as np
import pytest
import torch

from bundle.runtime import open_session
from export.build import export_bundle
from export.onnx_export import PROTOTYPE_INITIALIZER, prototype_vectors, replace_initializer
from registry.revision_settings import RevisionSettings
from registry.verdicts import verdict
from revision.rounds import RevisionRun, file_consult
from training.checkpoint import load_checkpoint
from training.splits import Split
from training.train_protopnet import load_run_data

MASKED = [0, 5]


def _masked_run(checkpoint, mnist_root, out):
    model, config, _ = load_checkpoint(checkpoint)
    data = load_run_data(config, mnist_root)
    small = {"val": Split(data["val"].images[:200], data["val"].labels[:200])}
    consult = file_consult([verdict(j, "reject", 1, "tester", note="background") for j in MASKED]
                           + [verdict(1, "accept", 1, "tester")])
    run = RevisionRun(model, config, RevisionSettings(mode="mask", last_layer_epochs=2, batch_size=100), data, out,
                      consult, eval_sets=small, log=lambda s: None)
    run.run()
    return run, model, data


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_protopnet_checkpoint"])
def test_masking_removes_influence_exactly_in_torch_and_onnx(request, tmp_path, mnist_root, fixture):
    run, model, data = _masked_run(request.getfixturevalue(fixture), mnist_root, tmp_path / "run")
    W = model.last_layer.weight.detach()
    assert W[:, MASKED].abs().sum() == 0 and W[:, 1].abs().sum() > 0  # re-fitted, masked columns held at 0
    x = data["val"].images[:64]
    with torch.no_grad():
        before = model.classify(x).clone()
        model.prototypes[MASKED] = torch.rand_like(model.prototypes[MASKED])
        assert torch.equal(model.classify(x), before)
    run, model, data = _masked_run(request.getfixturevalue(fixture), mnist_root, tmp_path / "run2")
    run.save_revised(tmp_path / "revised.pt", parent="tiny:0.1.0", parent_checkpoint_sha256="0" * 64)
    result = export_bundle(tmp_path / "revised.pt", tmp_path / "bundle", "tiny", "0.1.0-mask",
                           data_root=str(mnist_root), test_images=200, log=lambda s: None)
    m = result.bundle.manifest
    assert [p.id for p in m.prototypes] == list(range(model.prototypes.shape[0]))  # ids stable, no renumbering
    assert [p.id for p in m.prototypes if p.status == "masked"] == MASKED
    # a masked row keeps the class it stood for (its zero column no longer says)
    assert [m.prototypes[j].class_identity for j in MASKED] == [run.parent_identities[j] for j in MASKED]
    assert m.lineage.mode == "mask" and m.lineage.parent == "tiny:0.1.0" and m.lineage.masked == MASKED
    assert [v["prototype_id"] for v in m.lineage.verdicts] == [*MASKED, 1]
    assert m.lineage.comparison["masked"] == MASKED and "parent" in m.lineage.comparison["accuracy"]
    # ONNX: the masked prototypes' vectors replaced by random ones -> identical logits, other outputs moved
    vectors = prototype_vectors(result.bundle.model_path)
    changed = vectors.copy()
    changed[MASKED] = np.random.default_rng(0).random(changed[MASKED].shape).astype(np.float32)
    replace_initializer(result.bundle.model_path, tmp_path / "changed.onnx", PROTOTYPE_INITIALIZER, changed)
    images = data["test"].images[:100].numpy()
    original, _ = open_session(result.bundle.model_path, device="cpu")
    moved, _ = open_session(tmp_path / "changed.onnx", device="cpu")
    a = original.run(["logits", "distances"], {"image": images})
    b = moved.run(["logits", "distances"], {"image": images})
    assert np.array_equal(a[0], b[0])
    assert not np.allclose(a[1][:, MASKED], b[1][:, MASKED])
