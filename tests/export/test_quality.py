"""The quality report in a bundle: export writes it, `protoserve report` rewrites it, the manifest
keeps its checksums, and the figures say what the model does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.manifest import MANIFEST_FILE, BundleError, Manifest, QualityReport, read_bundle
from bundle.runtime import verify_bundle

COMMON = {"class_discrimination_auroc", "last_layer_used_share", "near_duplicate_pairs", "prototype_nearest_encoding"}
PROTOTYPEDL_FIGURES = COMMON | {"decoded_prototypes_own_class"}
PROTOTYPEDL_NOT_APPLICABLE = {"activation_precision", "stability", "deletion_auc", "insertion_auc",
                              "sanity_rank_correlation", "same_patch_duplicates"}
PROTOPNET_FIGURES = COMMON | {"same_patch_duplicates", "activation_precision.object", "stability",
                              "sanity_rank_correlation", "deletion_auc", "insertion_auc"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300)


def test_exported_bundles_carry_their_report(tiny_bundle, tiny_protopnet_bundle):
    for path, figures in ((tiny_bundle, PROTOTYPEDL_FIGURES), (tiny_protopnet_bundle, PROTOPNET_FIGURES)):
        bundle, _ = verify_bundle(path)
        q = bundle.manifest.quality
        assert q is not None and set(q.figures) == figures
        assert (q.data, q.split, q.seed, q.sample_size) == ("mnist", "validation", 0, 64)
        assert {q.picture, q.page} == {"quality.png", "quality.html"}
        assert {q.picture, q.page} <= set(bundle.manifest.files)
        assert [p.id for p in q.prototypes] == [row.id for row in bundle.manifest.prototypes]
        assert 0.0 <= q.figures["class_discrimination_auroc"].value <= 1.0
        assert q.figures["class_discrimination_auroc"].reference == 0.5
    q = read_bundle(tiny_bundle).manifest.quality
    assert set(q.not_applicable) == PROTOTYPEDL_NOT_APPLICABLE
    assert q.figures["decoded_prototypes_own_class"].detail["judge"] == "protopnet-mnist:1.0.0"
    q = read_bundle(tiny_protopnet_bundle).manifest.quality
    assert set(q.not_applicable) == {"decoded_prototypes_own_class"}
    precision = q.figures["activation_precision.object"]
    assert 0.0 < precision.reference < 0.5  # the share of inked pixels
    sanity = q.figures["sanity_rank_correlation"].detail
    assert isinstance(sanity["passes"], bool) and all(-1 <= sanity[k] <= 1 for k in ("across_images", "centred"))
    assert all("stability" in p.figures and "activation_precision.object" in p.figures for p in q.prototypes)


def test_the_quality_field_round_trips_and_an_edit_is_caught(tiny_protopnet_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_protopnet_bundle, tmp_path / "bundle"))
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest = Manifest.model_validate(raw)
    assert QualityReport.model_validate(raw["quality"]) == manifest.quality
    assert manifest.model_dump(mode="json")["quality"] == raw["quality"]
    raw["quality"]["figures"]["stability"]["value"] = 1.0
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="edited after export"):
        read_bundle(bundle)


def test_a_bundle_without_a_report_still_reads(tiny_bundle, tmp_path):
    from bundle.manifest import write_manifest

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    for name in ("quality.png", "quality.html"):
        (bundle / name).unlink()
    written = write_manifest(bundle, read_bundle(tiny_bundle).manifest.model_copy(update={"quality": None}))
    assert written.quality is None and "quality.png" not in written.files
    verify_bundle(bundle)


@pytest.mark.slow
def test_report_command_rewrites_the_report_and_keeps_the_bundle_valid(tiny_protopnet_bundle, mnist_root, tmp_path):
    bundle = Path(shutil.copytree(tiny_protopnet_bundle, tmp_path / "bundle"))
    before = (bundle / "quality.png").read_bytes()
    result = run_cli("report", str(bundle), "--data-root", str(mnist_root), "--sample", "24", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "quality tiny-protopnet:0.1.0" in result.stderr  # the progress bar
    assert "class_discrimination_auroc" in result.stdout and "(reference 0.5: chance)" in result.stdout
    q = verify_bundle(bundle)[0].manifest.quality
    assert (q.sample_size, q.seed, q.split_size) == (24, 3, 200)
    after = (bundle / "quality.png").read_bytes()
    assert after.startswith(b"\x89PNG") and after != before
    assert "tiny-protopnet:0.1.0" in (bundle / "quality.html").read_text()
    assert not list(bundle.glob(".*partial"))


def test_report_command_errors_are_one_line(tiny_bundle, tmp_path, capsys):
    from cli.main import main

    for args, fragment in (((str(tmp_path / "nothing"),), "not a bundle directory"),
                           ((str(tiny_bundle), "--sample", "0"), "--sample is 0")):
        assert main(["report", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], lines


def test_a_judge_must_be_another_model(tiny_bundle, mnist_root, tmp_path):
    from export.quality.report import QualityOptions, write_quality_report

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    q = write_quality_report(bundle, str(mnist_root), QualityOptions(sample=16, judge=bundle), progress=False,
                             log=lambda s: None)
    assert "decoded_prototypes_own_class" not in q.figures
    assert "is this model, not an independent one" in q.not_applicable["decoded_prototypes_own_class"]


def test_each_named_mask_of_a_split_gets_its_activation_precision(tiny_protopnet_bundle, mnist_root):
    """A split may carry masks by name (Decoy-MNIST: object and decoy): a mask over the whole image
    holds every activation (precision 1), an empty one none (0); a decoy's precision is better low."""
    import numpy as np

    from export.quality.report import QualityOptions, compute_quality, validation_split
    from training.config import Config

    bundle = read_bundle(tiny_protopnet_bundle)
    split = validation_split(Config.from_dict(bundle.manifest.training.config), mnist_root)
    options = QualityOptions(sample=16, curve_images=2, steps=4, encodings=200)
    plain = compute_quality(bundle, split, "mnist", options, log=lambda s: None, progress=False)
    ink = split.images[:, 0].numpy() > 0
    split.masks = {"object": ink, "everywhere": np.ones_like(ink), "decoy": np.zeros_like(ink)}
    q = compute_quality(bundle, split, "mnist", options, log=lambda s: None, progress=False)
    assert q.settings["masks"] == ["decoy", "everywhere", "object"]
    everywhere, decoy = q.figures["activation_precision.everywhere"], q.figures["activation_precision.decoy"]
    assert (everywhere.value, everywhere.reference) == (1.0, 1.0)
    assert (decoy.value, decoy.reference, decoy.higher_is_better) == (0.0, 0.0, False)
    assert q.figures["activation_precision.object"] == plain.figures["activation_precision.object"]


def test_quality_changes_say_how_each_figure_moved(tiny_protopnet_bundle):
    from bundle.manifest import QualityFigure
    from bundle.quality_changes import quality_changes

    before = read_bundle(tiny_protopnet_bundle).manifest.quality
    figures = dict(before.figures)
    figures["deletion_auc"] = figures["deletion_auc"].model_copy(update={"value": figures["deletion_auc"].value - 0.1})
    figures["stability"] = QualityFigure(value=figures["stability"].value - 0.2, higher_is_better=True)
    rows = [before.prototypes[0].model_copy(update={"figures": {**before.prototypes[0].figures, "auroc": 0.25}}),
            *before.prototypes[1:]]
    after = before.model_copy(update={"figures": figures, "prototypes": rows})
    changes = quality_changes(before, after)
    assert changes["figures"]["deletion_auc"]["change"] == pytest.approx(-0.1)
    assert changes["figures"]["deletion_auc"]["improved"] is True  # lower is better
    assert changes["figures"]["stability"]["improved"] is False
    assert changes["figures"]["class_discrimination_auroc"]["improved"] is None  # unchanged
    assert changes["prototypes"] == {rows[0].id: {"auroc": {"before": before.prototypes[0].figures["auroc"],
                                                            "after": 0.25}}}
    assert quality_changes(None, after) == {"figures": {}, "prototypes": {}}


def test_export_can_skip_the_report(tiny_checkpoint, mnist_root, tmp_path):
    from cli.main import build_parser
    from export.build import export_bundle

    args = build_parser().parse_args(["export", "--checkpoint", "c.pt", "--out", "b", "--no-quality"])
    assert args.no_quality and args.quality_sample == 500
    out = tmp_path / "bundle"
    export_bundle(tiny_checkpoint, out, "tiny", "0.2.0", data_root=str(mnist_root), test_images=200,
                  log=lambda s: None, quality=None)
    assert read_bundle(out).manifest.quality is None and not (out / "quality.png").exists()


MODELS = Path(__file__).resolve().parents[2] / "models"


def test_shipped_bundles_carry_their_reports_and_a_revision_shows_how_each_number_moved():
    from bundle.quality_changes import quality_changes

    for name in ("prototypedl_mnist/bundle", "protopnet_mnist/bundle"):
        q = verify_bundle(MODELS / name)[0].manifest.quality
        assert (q.split, q.sample_size, q.seed, q.split_size) == ("validation", 500, 0, 5000)
    parent = verify_bundle(MODELS / "protopnet_decoy_mnist" / "bundle")[0].manifest
    revised = verify_bundle(MODELS / "protopnet_decoy_mnist" / "revised" / "bundle")[0].manifest
    assert parent.quality.settings["masks"] == ["decoy", "object"]  # Decoy-MNIST's own masks
    assert parent.quality.figures["activation_precision.decoy"].higher_is_better is False
    moved = quality_changes(parent.quality, revised.quality)["figures"]
    assert moved["activation_precision.object"]["improved"] is True  # revised away from the background


def test_the_sanity_check_detail_separates_position_from_content():
    from export.quality.map_figures import _image_dependence

    rng = np.random.default_rng(0)
    where = rng.normal(0, 3, (7, 7))  # one prototype's map pattern shared by every image
    content = rng.normal(0, 1, (40, 7, 7))
    trained = where + content
    prototype = np.zeros(40, int)
    shared = _image_dependence(trained, where + rng.normal(0, 1, (40, 7, 7)), prototype)  # backbone gone, pattern kept
    assert np.mean(shared["rho_across_images"]) > 0.8 and abs(np.mean(shared["rho_centred"])) < 0.15
    same = _image_dependence(trained, 2 * trained + 1, prototype)  # maps that follow the image
    assert np.mean(same["rho_centred"]) > 0.99
    one = _image_dependence(trained[:1], trained[:1], prototype[:1])  # one pair: nothing to compare with
    assert np.isnan(one["rho_centred"]).all() and np.isnan(one["rho_across_images"]).all()
