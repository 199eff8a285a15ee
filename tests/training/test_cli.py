"""The training verbs as a user runs them: real processes, one-line errors, non-zero exits."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image


def run(*args, env_root=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PROTOSERVE_DATA_ROOT"}
    if env_root:
        env["PROTOSERVE_DATA_ROOT"] = str(env_root)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def test_missing_data_root_is_one_line(tmp_path):
    result = run("train", "--config", "configs/prototypedl_mnist_demo.yaml", "--out", str(tmp_path / "r"))
    assert_one_line_error(result, "no data root")
    result = run("train", "--config", "configs/prototypedl_mnist_demo.yaml", "--data-root", str(tmp_path / "x"))
    assert_one_line_error(result, "no such directory")


@pytest.mark.parametrize("text, fragment", [
    ("train: [1, 2\n", "not valid YAML"),
    ("model:\n  widths: 3\n", "model.widths: expected list[int]"),
    ("train:\n  lr: fast\n", "train.lr: expected float"),
    ("trian:\n  lr: 0.1\n", "unknown section(s) ['trian']"),
    ("model:\n  hidden_activation: tanh\n", "hidden_activation must be"),
    ("data:\n  val_sise: 5\n", "unknown key(s) ['val_sise']"),
])
def test_bad_config_is_one_line(tmp_path, mnist_root, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = run("train", "--config", str(config), "--out", str(tmp_path / "r"), env_root=mnist_root)
    assert_one_line_error(result, fragment)


def test_bad_checkpoint_is_one_line(tmp_path, mnist_root):
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"\x00" * 64)
    assert_one_line_error(run("evaluate", "--checkpoint", str(bad), env_root=mnist_root), "not a readable checkpoint")


def test_evaluate_and_visualize_a_checkpoint(tiny_checkpoint, tmp_path, mnist_root):
    result = run("evaluate", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "e.json"),
                 env_root=mnist_root)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "e.json").read_text())
    assert 0.3 < figures["test_accuracy"] <= 1.0  # chance is 0.1
    assert figures["train_reconstruction_error"] > 0
    assert len(figures["class_identities"]) == 15

    result = run("visualize", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "pics"),
                 env_root=mnist_root)
    assert result.returncode == 0, result.stderr
    names = {"fig2_reconstructions.png", "fig3_prototypes.png", "table1_weights.png", "table2_distances.png",
             "curves.png"}
    assert {p.name for p in (tmp_path / "pics").iterdir()} == names
    for name in names:
        with Image.open(tmp_path / "pics" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_train_refuses_to_overwrite_a_run(tmp_path, tiny_checkpoint, mnist_root):
    out = tiny_checkpoint.parent
    result = run("train", "--config", str(out / "config.yaml"), "--out", str(out), env_root=mnist_root)
    assert_one_line_error(result, "pass --resume")


def test_seed_flag_sets_the_runs_seed_and_the_run_records_it(tmp_path, tiny_checkpoint, mnist_root):
    import yaml

    from training.checkpoint import read_checkpoint

    config = yaml.safe_load((tiny_checkpoint.parent / "config.yaml").read_text())
    config["train"]["epochs"] = 1
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    outs = {}
    for seed in (config["train"]["seed"], config["train"]["seed"] + 1):  # two different seeds, whatever the config's
        outs[seed] = tmp_path / f"seed{seed}"
        result = run("train", "--config", str(tmp_path / "tiny.yaml"), "--seed", str(seed), "--out", str(outs[seed]),
                     env_root=mnist_root)
        assert result.returncode == 0, result.stderr
        assert yaml.safe_load((outs[seed] / "config.yaml").read_text())["train"]["seed"] == seed
    weights = [read_checkpoint(out / "last.pt")["model"] for out in outs.values()]
    assert any(not (a == b).all() for a, b in zip(weights[0].values(), weights[1].values(), strict=True))


def test_threads_flag_sets_the_runs_threads_and_refuses_zero(tmp_path, tiny_checkpoint, mnist_root):
    import yaml

    config = yaml.safe_load((tiny_checkpoint.parent / "config.yaml").read_text())
    config["train"]["epochs"] = 1
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = run("train", "--config", str(tmp_path / "tiny.yaml"), "--threads", "2", "--out", str(tmp_path / "two"),
                 env_root=mnist_root)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["train"]["num_threads"] == 2
    refused = run("train", "--config", str(tmp_path / "tiny.yaml"), "--threads", "0", "--out", str(tmp_path / "zero"),
                  env_root=mnist_root)
    assert_one_line_error(refused, "--threads 0")
    assert not (tmp_path / "zero").exists()


def test_ship_copies_a_finished_run_into_a_model_folder(tiny_protopnet_checkpoint, tmp_path):
    from training.checkpoint import read_checkpoint

    run_dir, out = tiny_protopnet_checkpoint.parent, tmp_path / "model"
    result = run("ship", "--run", str(run_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    payload = read_checkpoint(out / "checkpoint.pt")
    assert payload["training_state"] is None and payload["epoch"] == read_checkpoint(tiny_protopnet_checkpoint)["epoch"]
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert any((out / "push").glob("*.png"))
    missing = run("ship", "--run", str(tmp_path / "nowhere"), "--out", str(out))
    assert_one_line_error(missing, "checkpoint not found")


def test_ship_average_from_writes_the_mean_of_the_tail_checkpoints(tiny_checkpoint, tiny_protopnet_checkpoint,
                                                                   tmp_path):
    from training.checkpoint import read_checkpoint

    run_dir, out = tiny_checkpoint.parent, tmp_path / "averaged"
    result = run("ship", "--run", str(run_dir), "--out", str(out), "--average-from", "1")
    assert result.returncode == 0, result.stderr
    shipped = read_checkpoint(out / "checkpoint.pt")
    assert shipped["metrics"] == {"weight_average_of_epochs": [1, 2]} and shipped["epoch"] == 2
    epochs = [read_checkpoint(run_dir / "checkpoints" / f"epoch_{e:04d}.pt")["model"] for e in (1, 2)]
    moved = False
    for key, value in shipped["model"].items():
        if value.is_floating_point():
            assert (value - (epochs[0][key] + epochs[1][key]) / 2).abs().max() < 1e-6, key
            moved = moved or not (epochs[0][key] == epochs[1][key]).all()
    assert moved  # the two epochs differ, so the mean is neither of them

    too_late = run("ship", "--run", str(run_dir), "--out", str(tmp_path / "late"), "--average-from", "3")
    assert_one_line_error(too_late, "no epoch checkpoint from epoch 3")
    shutil.copytree(run_dir, tmp_path / "gap")
    (tmp_path / "gap" / "checkpoints" / "epoch_0001.pt").unlink()
    gap = run("ship", "--run", str(tmp_path / "gap"), "--out", str(tmp_path / "gap_out"), "--average-from", "1")
    assert_one_line_error(gap, "epoch_0001.pt: missing")
    pushed = run("ship", "--run", str(tiny_protopnet_checkpoint.parent), "--out", str(tmp_path / "p"),
                 "--average-from", "1")
    assert_one_line_error(pushed, "pushed onto training patches")
