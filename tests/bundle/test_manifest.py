"""A bundle on disk: read_bundle and `protoserve verify` accept the exported one and refuse damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.manifest import MANIFEST_FILE, SCHEMA_VERSION, BundleError, Manifest, read_bundle, write_manifest
from bundle.runtime import verify_bundle


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, change) -> None:
    raw = json.loads((bundle / MANIFEST_FILE).read_text())
    change(raw)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def expect_error(bundle: Path, file: str, fragment: str) -> None:
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(bundle / file) + ":"), message
    assert fragment in message, message


def test_exported_bundle_reads_and_verifies(tiny_bundle):
    bundle, probe = verify_bundle(tiny_bundle)
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION and m.tag == "tiny-prototypedl:0.1.0"
    assert probe.passed and probe.images == 10 and probe.provider == "CPUExecutionProvider"
    listed = set(m.files)
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - listed == {MANIFEST_FILE}
    assert {"model.onnx", "decoder.onnx", "probe.npz", "prototypes/000.png"} <= listed


@pytest.mark.parametrize("victim", ["model.onnx", "decoder.onnx", "probe.npz", "prototypes/003.png"])
def test_missing_file(bundle_copy, victim):
    (bundle_copy / victim).unlink()
    expect_error(bundle_copy, victim, "missing")


def test_missing_manifest(bundle_copy):
    (bundle_copy / MANIFEST_FILE).unlink()
    expect_error(bundle_copy, MANIFEST_FILE, "missing")


@pytest.mark.parametrize("victim", ["model.onnx", "decoder.onnx", "probe.npz", "prototypes/000.png"])
def test_flipped_byte(bundle_copy, victim):
    flip_byte(bundle_copy / victim, (bundle_copy / victim).stat().st_size // 2)
    expect_error(bundle_copy, victim, "sha256 does not match")


def test_truncated_file(bundle_copy):
    data = (bundle_copy / "model.onnx").read_bytes()
    (bundle_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    expect_error(bundle_copy, "model.onnx", "sha256 does not match")


def test_added_file(bundle_copy):
    (bundle_copy / "prototypes" / "999.png").write_bytes(b"not a prototype")
    expect_error(bundle_copy, "prototypes/999.png", "not listed in the manifest")


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m["class_names"].__setitem__(3, "8"), "edited after export"),  # valid value, wrong content
    (lambda m: m["metrics"].__setitem__("test_accuracy", 0.999), "edited after export"),
    (lambda m: m.__setitem__("family", "resnet"), "field family"),
    (lambda m: m["input"].__setitem__("channels", "one"), "field input.channels"),
    (lambda m: m.pop("class_names"), "field class_names"),
    (lambda m: m.__setitem__("surprise", 1), "field surprise"),
    (lambda m: m["prototypes"][0]["weights"].pop(), "prototype 0 has 9 weights"),
    (lambda m: m["model"]["outputs"].pop(2), "model outputs lack ['distances']"),
    (lambda m: m["files"].pop("model.onnx"), "model.onnx is referenced but not listed"),
    (lambda m: m["files"].__setitem__("../outside.onnx", "0" * 64), "not a path inside the bundle"),
])
def test_wrong_manifest_field(bundle_copy, change, fragment):
    edit_manifest(bundle_copy, change)
    expect_error(bundle_copy, MANIFEST_FILE, fragment)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", 1.0, True, None])
def test_wrong_schema_version(bundle_copy, version):
    edit_manifest(bundle_copy, lambda m: m.__setitem__("schema_version", version))
    expect_error(bundle_copy, MANIFEST_FILE, f"schema version {version!r}, this protoserve reads {SCHEMA_VERSION}")


def test_not_json(bundle_copy):
    (bundle_copy / MANIFEST_FILE).write_text('{"schema_version": 1,')
    expect_error(bundle_copy, MANIFEST_FILE, "not readable JSON")


def test_golden_probe_catches_a_consistently_resigned_graph(bundle_copy):
    """Checksums alone trust whoever rewrote the manifest; the probe checks what the graph computes."""
    from export.onnx_export import prototype_vectors, replace_initializer

    model = bundle_copy / "model.onnx"
    name = read_bundle(bundle_copy).manifest.model.prototype_initializer
    replace_initializer(model, model, name, prototype_vectors(model, name) + 0.01)
    manifest = Manifest.model_validate_json((bundle_copy / MANIFEST_FILE).read_text())
    write_manifest(bundle_copy, manifest)  # checksums and digest now agree with the edited graph
    read_bundle(bundle_copy)
    expect_error(bundle_copy, "model.onnx", "golden probe failed: logits: differs")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_verify_command(tiny_bundle, bundle_copy):
    ok = run_cli("verify", str(tiny_bundle))
    assert ok.returncode == 0, ok.stderr
    assert "ok (tiny-prototypedl:0.1.0" in ok.stdout and "golden probe of 10 images" in ok.stdout
    flip_byte(bundle_copy / "decoder.onnx", 100)
    bad = run_cli("verify", str(bundle_copy))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"protoserve verify: error: {bundle_copy / 'decoder.onnx'}: sha256 does not match the manifest "
        "(damaged or edited)"]


def test_protopnet_adds_outputs_not_a_new_format(tiny_bundle, tmp_path):
    """A ProtoPNet bundle is the same schema: one more output, provenance rows, no decoder."""
    from bundle.manifest import TensorSpec

    m = read_bundle(tiny_bundle).manifest
    outputs = [t for t in m.model.outputs if t.name not in ("latent", "reconstruction")]
    outputs.append(TensorSpec(name="similarity_maps", shape=["N", 15, 7, 7]))
    rows = [p.model_copy(update={"provenance": {"image_index": 3, "patch_box": [0, 0, 1, 1]}, "image": None})
            for p in m.prototypes]
    protopnet = m.model_copy(update={"family": "protopnet", "decoder": None, "prototypes": rows, "quality": None,
                                     "model": m.model.model_copy(update={"outputs": outputs}),
                                     "domain": m.domain.model_copy(update={"features": None})})
    folder = tmp_path / "protopnet"
    folder.mkdir()
    for name in ("model.onnx", "probe.npz"):
        shutil.copy(tiny_bundle / name, folder / name)
    written = write_manifest(folder, protopnet)
    bundle = read_bundle(folder)
    assert bundle.decoder_path is None and "similarity_maps" in bundle.output_names
    assert written.prototypes[0].provenance["image_index"] == 3

    without = protopnet.model_copy(update={"model": m.model.model_copy(update={"outputs": outputs[:-1]})})
    with pytest.raises(BundleError, match=r"model outputs lack \['similarity_maps'\]"):
        write_manifest(folder, without)


def test_a_calibration_must_find_the_output_it_reads(tiny_bundle, bundle_copy):
    """The out-of-domain rule reads the output its calibration names; a graph without it is refused."""
    m = read_bundle(tiny_bundle).manifest
    assert m.domain.features == "latent" and m.model.output("latent") is not None
    with pytest.raises(BundleError, match="reads output 'pooled_latent', which model.onnx lacks"):
        write_manifest(bundle_copy, m.model_copy(update={"domain": m.domain.model_copy(
            update={"features": "pooled_latent"})}))


def test_prototypedl_needs_its_decoder(tiny_bundle, bundle_copy):
    m = read_bundle(tiny_bundle).manifest
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="family 'prototypedl' needs a decoder"):
        write_manifest(bundle_copy, m.model_copy(update={"decoder": None}))


def test_export_command_errors_are_one_line(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    from cli.main import main

    def error_of(*argv) -> str:
        assert main(list(argv)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "checkpoint not found" in error_of("export", "--checkpoint", str(tmp_path / "nope.pt"),
                                              "--out", str(tmp_path / "b"))
    assert "bundles are immutable" in error_of("export", "--checkpoint", str(tiny_checkpoint),
                                               "--out", str(tiny_bundle))
    assert error_of("verify", str(tmp_path / "nothing")) == (
        f"protoserve verify: error: {tmp_path / 'nothing'}: not a bundle directory (no such directory)")


@pytest.mark.slow
def test_export_command_on_the_whole_test_set(tiny_checkpoint, mnist_root, tmp_path):
    out = tmp_path / "bundle"
    result = run_cli("export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--name", "tiny",
                     "--version", "2.0.0", "--data-root", str(mnist_root))
    assert result.returncode == 0, result.stderr
    assert "parity on 10000 images" in result.stdout and "argmax mismatches 0, top-3 mismatches 0" in result.stdout
    assert "bundle tiny:2.0.0 written" in result.stdout
    assert run_cli("verify", str(out)).returncode == 0
    assert read_bundle(out).manifest.quality.sample_size == 500  # export adds the quality report by default
