import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import Config
from training.prototypedl import PrototypeDL


def test_round_trip_keeps_weights_and_config(tmp_path):
    config = Config.from_dict({"model": {"n_prototypes": 12}})
    model = PrototypeDL(config.model)
    save_checkpoint(tmp_path / "c.pt", model, config, epoch=3, metrics={"val_accuracy": 0.5})
    loaded, loaded_config, payload = load_checkpoint(tmp_path / "c.pt")
    assert loaded_config == config and payload["epoch"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert not loaded.training


def test_mismatched_shapes_are_refused(tmp_path):
    config = Config()
    model = PrototypeDL(config.model)
    save_checkpoint(tmp_path / "c.pt", model, config, epoch=1, metrics={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    payload["config"]["model"]["n_prototypes"] = 20  # the config no longer fits the weights
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"prototypes has shape \(15, 40\), the config needs \(20, 40\)"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="differs from the run's config"):
        load_checkpoint(tmp_path / "c.pt", expect_config=Config.from_dict({"model": {"latent_maps": 8}}))


def test_missing_keys_and_foreign_files_are_refused(tmp_path):
    config = Config()
    save_checkpoint(tmp_path / "c.pt", PrototypeDL(config.model), config, epoch=1, metrics={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    del payload["model"]["prototypes"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing \\['prototypes'\\]"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a protoserve checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_pickled_module_is_never_loaded(tmp_path):
    torch.save(PrototypeDL(Config().model), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "module.pt")
