"""ProtoPNet training: the schedule's stages, model selection on validation, resume, CUB-layout folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import tiny_protopnet_dict

from cli.main import main
from training.checkpoint import load_checkpoint
from training.config import Config
from training.cub import class_names, load_cub, segmentation_mask
from training.splits import DataError
from training.train_protopnet import ProtoPNetTrainer


def _trainer(cfg: dict, out, mnist_root) -> ProtoPNetTrainer:
    return ProtoPNetTrainer(Config.from_dict(cfg), out, data_root=mnist_root, log=lambda s: None)


def test_schedule_warm_joint_push_last_layer(tmp_path, mnist_root):
    trainer = _trainer(tiny_protopnet_dict(), tmp_path, mnist_root)
    features0 = [p.detach().clone() for p in trainer.model.features.parameters()]
    last0 = trainer.model.last_layer.weight.detach().clone()
    add_on0 = trainer.model.add_on[0].weight.detach().clone()

    trainer.fit(stop_after=1)  # warm-up: add-on layers and prototypes only
    assert all(torch.equal(a, p) for a, p in zip(features0, trainer.model.features.parameters(), strict=True))
    assert torch.equal(last0, trainer.model.last_layer.weight)
    assert not torch.equal(add_on0, trainer.model.add_on[0].weight)
    assert (trainer.model.push_source < 0).all()

    trainer.fit()  # joint, push and last layer after epochs 2 and 3
    assert not all(torch.equal(a, p) for a, p in zip(features0, trainer.model.features.parameters(), strict=True))
    assert not torch.equal(last0, trainer.model.last_layer.weight)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["phase"], r["pushed"]) for r in rows] == [(1, "warm", False), (2, "joint", True),
                                                                      (3, "joint", True)]
    assert all(r["push_purity"] == 1.0 for r in rows if r["pushed"])
    assert len(list((tmp_path / "push" / "epoch_0003").glob("*.png"))) == 3 * 20

    # best.pt: the pushed epoch with the best validation accuracy, never an unpushed one.
    best = max((r for r in rows if r["pushed"]), key=lambda r: r["val_accuracy"])
    model, _, payload = load_checkpoint(tmp_path / "best.pt")
    assert payload["epoch"] == best["epoch"] and (model.push_source[:, 0] >= 0).all()
    labels = trainer.data["train"].labels
    assert [int(labels[i]) for i in model.push_source[:, 0]] == model.class_identities()


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, mnist_root):
    cfg = tiny_protopnet_dict(push_start=1, push_every=2)
    cfg["train"]["elastic"] = True
    straight = _trainer(cfg, tmp_path / "straight", mnist_root)
    straight.fit()
    _trainer(cfg, tmp_path / "split", mnist_root).fit(stop_after=2)
    resumed = _trainer(cfg, tmp_path / "split", mnist_root)
    resumed.resume()
    assert resumed.epoch == 2
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_cli_trains_and_evaluates_a_protopnet(tmp_path, mnist_root, capsys):
    import yaml

    cfg = tiny_protopnet_dict()
    cfg["train"]["epochs"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out),
                 "--data-root", str(mnist_root)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data-root", str(mnist_root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["push_purity"] == 1.0 and result["pushed_prototypes"] == 20
    assert 0.0 <= result["test_accuracy"] <= 1.0


def write_cub_folder(root, n_classes=3, per_class=6, with_boxes=True, with_segmentations=True):
    """A CUB-200-2011-layout folder: each image is grey noise with a coloured square (the 'bird')
    whose colour is the class, inside its bounding box."""
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    lines = {"images.txt": [], "train_test_split.txt": [], "image_class_labels.txt": [], "bounding_boxes.txt": []}
    image_id = 0
    for k in range(n_classes):
        folder = root / "images" / f"{k + 1:03d}.Bird_{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image_id += 1
            pixels = rng.integers(100, 156, size=(40, 50, 3), dtype=np.uint8)
            x, y = int(rng.integers(0, 30)), int(rng.integers(0, 20))
            pixels[y:y + 20, x:x + 20] = colours[k]
            rel = f"{folder.name}/img_{i}.jpg"
            Image.fromarray(pixels).save(root / "images" / rel, quality=95)
            if with_segmentations:
                mask = np.zeros((40, 50), dtype=np.uint8)
                mask[y:y + 20, x:x + 20] = 255
                (root / "segmentations" / folder.name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "segmentations" / folder.name / f"img_{i}.png")
            lines["images.txt"].append(f"{image_id} {rel}")
            lines["train_test_split.txt"].append(f"{image_id} {int(i < per_class - 2)}")
            lines["image_class_labels.txt"].append(f"{image_id} {k + 1}")
            lines["bounding_boxes.txt"].append(f"{image_id} {x}.0 {y}.0 20.0 20.0")
    if not with_boxes:
        del lines["bounding_boxes.txt"]
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("".join(f"{k + 1} {k + 1:03d}.Bird_{k}\n" for k in range(n_classes)))
    return root


def test_cub_layout_folder_loads_with_splits_boxes_and_masks(tmp_path):
    root = write_cub_folder(tmp_path / "cub")
    data = load_cub(root, input_size=32, val_size=2, split_seed=0)
    assert (len(data["train"]), len(data["val"]), len(data["test"])) == (10, 2, 6)
    assert sorted(data["test"].labels.tolist()) == [0, 0, 1, 1, 2, 2]
    x = data["train"].images[torch.tensor([0, 1])]
    assert x.shape == (2, 3, 32, 32) and data["train"].images.shape == (10, 3, 32, 32)
    # Cropped to the box, every image is the class colour (normalised with the ImageNet statistics).
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for split in data.values():
        for i in range(len(split)):
            pixels = split.images[i] * std + mean
            colour = pixels.mean(dim=(1, 2))
            assert int(colour.argmax()) == int(split.labels[i]) and colour.max() > 0.9
    uncropped = load_cub(root, input_size=32, val_size=2, crop_to_bbox=False)["train"].images[0] * std + mean
    assert uncropped.mean(dim=(1, 2)).max() < 0.8  # mostly grey noise around the square
    assert class_names(root) == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    mask = segmentation_mask(root, "001.Bird_0/img_0.jpg")
    assert mask.shape == (40, 50) and mask.sum() == 400
    assert segmentation_mask(write_cub_folder(tmp_path / "plain", with_segmentations=False),
                             "001.Bird_0/img_0.jpg") is None


def test_cub_layout_errors_name_the_file(tmp_path):
    root = write_cub_folder(tmp_path / "cub")
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt: missing"):
        load_cub(root)
    root = write_cub_folder(tmp_path / "cub2")
    with pytest.raises(DataError, match="val_size 50"):
        load_cub(root, val_size=50)


def test_protopnet_trains_on_a_cub_layout_folder(tmp_path):
    root = write_cub_folder(tmp_path / "cub", with_boxes=False)
    cfg = {
        "data": {"dataset": "cub", "root": str(root), "val_size": 2},
        "model": {"family": "protopnet", "backbone": "small_cnn", "in_channels": 3, "input_size": 32,
                  "n_prototypes": 6, "n_classes": 3, "prototype_dim": 8},
        "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "elastic": False, "num_threads": 1},
        "schedule": {"warm_epochs": 1, "push_start": 2, "last_layer_epochs": 1},
    }
    trainer = ProtoPNetTrainer(Config.from_dict(cfg), tmp_path / "run", log=lambda s: None)
    metrics = trainer.fit()
    assert metrics["pushed"] and metrics["push_purity"] == 1.0
    assert len(list((tmp_path / "run" / "push" / "epoch_0002").glob("*_source.png"))) == 6


def test_cub_masks_are_cropped_and_resized_as_the_images_are(tmp_path):
    root = write_cub_folder(tmp_path / "cub")
    cropped = load_cub(root, input_size=32, val_size=2)["train"].images
    assert all(cropped.mask(i).shape == (32, 32) and cropped.mask(i).all() for i in range(len(cropped)))
    whole = load_cub(root, input_size=50, val_size=2, crop_to_bbox=False)["train"].images
    for i in range(len(whole)):  # the square is 20x20 of 40x50 pixels; resized to 50x50: 20x25
        pixels = whole[i] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + \
            torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        brightest = pixels.max(dim=0).values.numpy()  # the class colour is 255 in one channel, noise < 156
        mask = whole.mask(i)
        assert mask.sum() == 20 * 25
        assert brightest[mask].mean() > 0.9 and brightest[~mask].mean() < 0.65  # the mask sits on the square
    plain = load_cub(write_cub_folder(tmp_path / "plain", with_segmentations=False), input_size=32, val_size=2)
    assert plain["train"].images.mask(0) is None


def test_object_overlap_is_the_boxs_share_of_foreground():
    from training.push import object_overlap

    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True
    assert object_overlap((0, 10, 0, 5), mask) == 1.0
    assert object_overlap((0, 10, 5, 10), mask) == 0.0
    assert object_overlap((2, 4, 3, 7), mask) == 0.5


def test_a_protopnet_on_a_cub_folder_reports_where_its_prototypes_landed(tmp_path, capsys):
    """Train and push on a CUB-layout folder with masks (uncropped: the 'bird' is a square on noise),
    then export: each prototype's provenance says how much of its activation box is on the bird."""
    from export.build import export_bundle

    root = write_cub_folder(tmp_path / "cub", per_class=8)
    cfg = tiny_protopnet_dict(push_start=2, push_every=1)
    cfg["data"] = {"dataset": "cub", "val_size": 3, "split_seed": 0, "crop_to_bbox": False}
    cfg["model"].update(n_classes=3, n_prototypes=6, in_channels=3, input_size=32)
    cfg["train"].update(epochs=2, batch_size=6, eval_batch_size=18)
    logs = []
    trainer = ProtoPNetTrainer(Config.from_dict(cfg), tmp_path / "run", data_root=root, log=logs.append)
    trainer.fit()
    pushed = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert pushed["pushed"] and 0.0 <= pushed["push_object_overlap"] <= 1.0
    assert 0 <= pushed["push_on_background"] <= 6
    assert any("on the object" in line for line in logs)
    bundle = export_bundle(tmp_path / "run" / "best.pt", tmp_path / "bundle", "tiny-cub", "0.1.0",
                           data_root=str(root), log=lambda s: None).bundle
    overlaps = [row.provenance["activation_box_on_object"] for row in bundle.manifest.prototypes]
    images = trainer.data["train"].images
    for row, value in zip(bundle.manifest.prototypes, overlaps, strict=True):
        box = row.provenance["activation_box"]
        mask = images.mask(row.provenance["source_index"])
        assert value == pytest.approx(mask[box["y0"]:box["y1"], box["x0"]:box["x1"]].mean())
    assert np.mean(overlaps) == pytest.approx(pushed["push_object_overlap"])
    quality = bundle.manifest.quality  # export's report reads the folder's segmentations as the object mask
    assert quality.settings["masks"] == ["object"] and quality.split_size == 3
    assert 0.0 <= quality.figures["activation_precision.object"].value <= 1.0
