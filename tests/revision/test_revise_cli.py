"""`protoserve revise`: bad input is one readable line and exit 2; the terminal mode writes verdicts
as it goes; a whole revision writes a new bundle version with its lineage."""

import json

import pytest

from bundle.manifest import read_bundle
from cli.main import main
from registry.verdicts import read_verdicts, verdict
from revision.terminal_review import terminal_consult
from training.checkpoint import load_checkpoint
from training.train_protopnet import load_run_data


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, tiny_protopnet_checkpoint, mnist_root):
    base = ["revise", "--checkpoint", str(tiny_protopnet_checkpoint), "--out", str(tmp_path / "r"),
            "--data-root", str(mnist_root)]
    cases = [
        (["revise", "--out", str(tmp_path / "r")], "give the model to revise"),
        (base + ["--verdicts", str(tmp_path / "none.jsonl")], "verdict file not found"),
        (base + ["--interactive"], "--interactive needs --verdicts"),
        (base + ["--mode", "mask"], "--mode mask needs verdicts"),
        (base + ["--rounds", "0", "--simulate"], "rounds must be >= 1"),
        (base + ["--train-subset", "0", "--simulate"], "train subset 0: must be at least 1"),
        (["revise", "--bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")], "not a bundle directory"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(verdict(1, "reject", 1, "ada").to_json() + "\n" + '{"prototype_id": 2, "verdict": "nope"}\n')
    cases.append((base + ["--verdicts", str(bad)], f"{bad}:2: "))
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(verdict(999, "reject", 1, "ada").to_json() + "\n")
    cases.append((base + ["--verdicts", str(unknown)], "prototype id(s) [999] do not exist"))
    for argv, message in cases:
        code, err = _run(argv, capsys)
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_terminal_mode_appends_each_answer_and_stops_on_quit(tmp_path, tiny_protopnet_checkpoint, mnist_root):
    model, config, _ = load_checkpoint(tiny_protopnet_checkpoint)
    train = load_run_data(config, mnist_root)["train"]
    answers = iter(["r", "maybe", "a", "s", "u", "q"])
    shown = []
    path = tmp_path / "verdicts.jsonl"
    consult = terminal_consult(path, tmp_path / "pictures", "ada", train, read=lambda prompt: next(answers),
                               write=shown.append)
    given = consult(1, model, None)
    assert [(v.prototype_id, v.verdict) for v in given] == [(0, "reject"), (1, "accept"), (3, "unsure")]
    assert read_verdicts(path) == given  # written as they came
    assert all(v.source == "ada" and v.round == 1 for v in given)
    pictures = [line.strip() for line in shown if line.strip().endswith(".png")]
    assert pictures and all((tmp_path / "pictures").exists() for _ in pictures)
    assert any("000_source.png" in p for p in pictures)


@pytest.mark.slow
def test_revise_mask_writes_a_bundle_with_lineage(tmp_path, capsys, tiny_protopnet_checkpoint, tiny_protopnet_bundle,
                                                  mnist_root):
    parent = read_bundle(tiny_protopnet_bundle).manifest
    verdicts = tmp_path / "v.jsonl"
    verdicts.write_text(verdict(2, "reject", 1, "ada").to_json() + "\n")
    out = tmp_path / "revised"
    code = main(["revise", "--bundle", str(tiny_protopnet_bundle), "--checkpoint", str(tiny_protopnet_checkpoint),
                 "--out", str(out), "--mode", "mask", "--verdicts", str(verdicts), "--data-root", str(mnist_root)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["version"] == f"{parent.version}-mask" and manifest["name"] == parent.name
    lineage = manifest["lineage"]
    assert lineage["parent"] == parent.tag and lineage["masked"] == [2] and lineage["mode"] == "mask"
    assert lineage["verdicts"][0]["prototype_id"] == 2
    assert [p["status"] for p in manifest["prototypes"]].count("masked") == 1
    assert [p["id"] for p in manifest["prototypes"]] == [p.id for p in parent.prototypes]
    quality = manifest["quality"]  # the revised version's own report; the masked prototype is left out of it
    assert quality["figures"]["last_layer_used_share"]["detail"]["unused"] == [2]
    assert quality["figures"]["class_discrimination_auroc"]["n"] == len(parent.prototypes) - 1
    code = main(["revise", "--bundle", str(tiny_protopnet_bundle), "--out", str(out), "--mode", "mask",
                 "--verdicts", str(verdicts), "--data-root", str(mnist_root)])
    assert code == 2  # the checkpoint beside the bundle is not there
