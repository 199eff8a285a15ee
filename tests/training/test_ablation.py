"""The paper's ablation variants and the moving average of the weights, on the one trainer."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config_dict

from training.checkpoint import load_checkpoint
from training.config import Config, ConfigError
from training.evaluate import evaluate_prototypedl
from training.prototypedl import PrototypeDL
from training.train_prototypedl import PrototypeDLTrainer as Trainer

REPO = Path(__file__).resolve().parents[2]
FULLY_CONNECTED = {"classifier": "fully_connected"}
PLAIN_CNN = {"classifier": "fully_connected", "decoder": False, "hidden_activation": "relu",
             "latent_activation": "relu"}


def _config(model: dict | None = None, **train) -> Config:
    raw = tiny_config_dict(**train)
    raw["model"].update(model or {})
    return Config.from_dict(raw)


def test_the_variants_have_the_papers_parts():
    paper = PrototypeDL(_config().model)
    fc = PrototypeDL(_config(FULLY_CONNECTED).model)
    plain = PrototypeDL(_config(PLAIN_CNN).model)
    assert paper.prototypes.shape == (15, 40) and paper.decoder is not None
    assert fc.prototypes is None and fc.decoder is not None
    assert fc.fully_connected.out_features == 15  # the prototype layer's width
    assert plain.prototypes is None and plain.decoder is None
    assert isinstance(plain.encoder.layers[-1], torch.nn.ReLU)  # ReLU throughout
    assert isinstance(paper.encoder.layers[-1], torch.nn.Sigmoid)  # the latent in the unit hypercube
    x = torch.rand(4, 1, 28, 28)
    out = plain(x)
    assert out.reconstruction is None and out.distances is None and out.logits.shape == (4, 10)
    assert torch.allclose(plain.classify(x), out.logits)


def test_a_variants_absent_parts_add_nothing_to_the_loss(tmp_path, mnist_root):
    trainer = Trainer(_config(PLAIN_CNN), tmp_path, mnist_root, log=lambda line: None)
    metrics = trainer.fit()
    assert metrics["train_R"] == metrics["train_R1"] == metrics["train_R2"] == 0.0
    assert metrics["train_total"] == pytest.approx(metrics["train_E"])
    figures = evaluate_prototypedl(load_checkpoint(tmp_path / "best.pt")[0], trainer.data)
    assert "train_reconstruction_error" not in figures and "class_identities" not in figures


def test_fixed_identity_weights_need_the_prototype_layer():
    with pytest.raises(ConfigError, match="fixed_identity_weights needs classifier 'prototypes'"):
        _config({**FULLY_CONNECTED, "n_prototypes": 10, "fixed_identity_weights": True})


def test_validation_and_best_checkpoint_read_the_moving_average(tmp_path, mnist_root):
    trainer = Trainer(_config(epochs=2, ema_decay=0.9), tmp_path, mnist_root, log=lambda line: None)
    trainer.fit()
    state = lambda name: load_checkpoint(tmp_path / name)[0].state_dict()  # noqa: E731
    average, weights = trainer.ema.state_dict(), trainer.model.state_dict()
    assert not torch.equal(average["prototypes"], weights["prototypes"])
    assert all(torch.equal(v, state("checkpoints/epoch_0002.pt")[k]) for k, v in average.items())
    assert all(torch.equal(v, state("last.pt")[k]) for k, v in weights.items())  # resume needs the weights
    best_epoch = load_checkpoint(tmp_path / "best.pt")[2]["epoch"]
    best = state(f"checkpoints/epoch_{best_epoch:04d}.pt")
    assert all(torch.equal(v, state("best.pt")[k]) for k, v in best.items())


def test_resume_restores_the_moving_average(tmp_path, mnist_root):
    cfg = _config(epochs=2, ema_decay=0.9, elastic=True, schedule="cosine")
    straight = Trainer(cfg, tmp_path / "straight", mnist_root, log=lambda line: None)
    straight.fit()
    Trainer(cfg, tmp_path / "split", mnist_root, log=lambda line: None).fit(stop_after=1)
    resumed = Trainer(cfg, tmp_path / "split", mnist_root, log=lambda line: None)
    resumed.resume()
    resumed.fit()
    for key, value in straight.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key


@pytest.mark.slow
def test_ablation_benchmark_runs_every_variant_and_reports(tmp_path, mnist_root):
    import subprocess

    out = tmp_path / "ablation"
    command = [sys.executable, str(REPO / "benchmarks/ablation.py"), "--epochs", "1", "--seeds", "0",
               "--train-subset", "300", "--out", str(out), "--png", str(tmp_path / "curve.png"),
               "--data-root", str(mnist_root)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for variant in ("prototypedl", "fc_instead_of_prototypes", "plain_cnn"):
        assert variant in result.stdout
        config = (out / f"{variant}_seed0" / "config.yaml").read_text()
        assert "classifier: " + ("prototypes" if variant == "prototypedl" else "fully_connected") in config
    results = json.loads((out / "ablation.json").read_text())
    assert all(0.0 <= rows[0]["test_accuracy"] <= 1.0 for rows in results.values())
    assert (tmp_path / "curve.png").stat().st_size > 0
    # a second call trains nothing: every run is finished
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training " not in again.stdout


def test_the_fully_connected_variant_learns_where_default_init_saturated_the_latent(mnist_root):
    """With PyTorch's default init the reconstruction term saturated the sigmoid latent within ~50 steps
    and the cross-entropy stayed at ln 10; the prototype-like init keeps the latent alive."""
    from training.datasets import load_run_data
    from training.prototypedl import prototypedl_loss

    config = _config(FULLY_CONNECTED)
    config.model.widths, config.model.latent_maps = [32, 32, 32], 10
    train = load_run_data(config, mnist_root)["train"]
    x, y = torch.as_tensor(train.images[:2000]).float(), torch.as_tensor(train.labels[:2000]).long()
    torch.manual_seed(0)
    model = PrototypeDL(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        i = torch.randint(0, len(x), (64,))
        loss = prototypedl_loss(model(x[i]), x[i], y[i], config.loss)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
    with torch.no_grad():
        assert model.encode(x[:256]).std(dim=0).mean() > 0.05  # the latent still varies between inputs
        assert prototypedl_loss(model(x[:512]), x[:512], y[:512], config.loss).E < 1.8  # ln 10 = 2.30
