import pytest
import torch
import torch.nn.functional as F

from training.config import Config, LossConfig, ModelConfig
from training.prototypedl import PrototypeDL, class_identities, prototypedl_loss, squared_distances


def test_paper_shapes_for_mnist():
    model = PrototypeDL(ModelConfig())
    out = model(torch.rand(5, 1, 28, 28))
    shapes = []
    x = torch.rand(1, 1, 28, 28)
    for layer in model.encoder.layers:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(32, 14, 14), (32, 7, 7), (32, 4, 4), (10, 2, 2)]  # the paper's 40-d latent
    assert out.latent.shape == (5, 40)
    assert out.reconstruction.shape == (5, 1, 28, 28)
    assert out.distances.shape == (5, 15) and out.logits.shape == (5, 10)
    assert model.prototypes.shape == (15, 40)
    assert 0 <= float(model.prototypes.detach().min()) and float(model.prototypes.detach().max()) <= 1  # unit hypercube
    assert ((out.latent > 0) & (out.latent < 1)).all()  # sigmoid latent
    assert ((out.reconstruction > 0) & (out.reconstruction < 1)).all()  # sigmoid output


def test_colour_64px_case_study_is_a_config():
    cfg = ModelConfig(in_channels=3, input_size=64, n_classes=11, hidden_activation="sigmoid")
    out = PrototypeDL(cfg)(torch.rand(2, 3, 64, 64))
    assert out.latent.shape == (2, 10 * 4 * 4)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.logits.shape == (2, 11)


def test_hidden_activation_is_a_config_choice():
    relu = PrototypeDL(ModelConfig(hidden_activation="relu"))
    sig = PrototypeDL(ModelConfig(hidden_activation="sigmoid"))
    kinds = lambda m: [type(layer).__name__ for layer in m.encoder.layers]  # noqa: E731
    assert kinds(relu) == ["Conv2d", "ReLU"] * 3 + ["Conv2d", "Sigmoid"]
    assert kinds(sig) == ["Conv2d", "Sigmoid"] * 4
    assert type(relu.decoder.layers[-1]).__name__ == "Sigmoid"


def test_squared_distances_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    expected = torch.tensor([[2.0, 4.0, 9.0], [1.0, 1.0, 8.0]])
    assert torch.equal(squared_distances(z, p), expected)


def test_each_loss_term_against_a_hand_computation():
    torch.manual_seed(0)
    model = PrototypeDL(ModelConfig(n_prototypes=3))
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([0, 3, 3, 9])
    out = model(x)
    terms = prototypedl_loss(out, x, y, LossConfig(lambda_R=0.1, lambda_R1=0.2, lambda_R2=0.3))

    z, p, d = out.latent, model.prototypes, out.distances
    dist = [[float(((z[i] - p[j]) ** 2).sum()) for j in range(3)] for i in range(4)]
    R1 = sum(min(dist[i][j] for i in range(4)) for j in range(3)) / 3
    R2 = sum(min(dist[i][j] for j in range(3)) for i in range(4)) / 4
    R = sum(float(((out.reconstruction[i] - x[i]) ** 2).sum()) for i in range(4)) / 4
    logits = torch.stack([model.last_layer.weight @ d[i] for i in range(4)])
    E = float(-torch.log_softmax(logits, 1)[torch.arange(4), y].mean())
    assert float(terms.R1) == pytest.approx(R1, rel=1e-5)
    assert float(terms.R2) == pytest.approx(R2, rel=1e-5)
    assert float(terms.R) == pytest.approx(R, rel=1e-5)
    assert float(terms.E) == pytest.approx(E, rel=1e-5)
    assert float(terms.total) == pytest.approx(E + 0.1 * R + 0.2 * R1 + 0.3 * R2, rel=1e-5)


def test_R1_and_R2_semantics():
    """R1: each prototype to its nearest input; R2: each input to its nearest prototype."""
    z = torch.tensor([[0.0], [10.0]])
    p = torch.tensor([[0.0], [1.0], [2.0]])
    d = squared_distances(z, p)  # input 0 is near all prototypes, input 1 near none
    from training.prototypedl import Output
    out = Output(latent=z, reconstruction=torch.zeros(2, 1), distances=d, logits=torch.zeros(2, 2))
    terms = prototypedl_loss(out, torch.zeros(2, 1), torch.tensor([0, 1]), LossConfig())
    assert float(terms.R1) == pytest.approx((0 + 1 + 4) / 3)  # every prototype is near input 0
    assert float(terms.R2) == pytest.approx((0 + 64) / 2)  # input 1 is 8 away from prototype 2


def test_gradients_reach_prototypes_encoder_decoder_and_W():
    model = PrototypeDL(ModelConfig())
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    prototypedl_loss(model(x), x, y, LossConfig()).total.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    # Through E alone too: the prototypes shape the classification.
    model.zero_grad()
    F.cross_entropy(model(x).logits, y).backward()
    assert float(model.prototypes.grad.abs().sum()) > 0


def test_fixed_identity_weights_special_case():
    cfg = ModelConfig(n_prototypes=10, fixed_identity_weights=True)
    model = PrototypeDL(cfg)
    assert torch.equal(model.last_layer.weight, -torch.eye(10))
    assert not model.last_layer.weight.requires_grad
    x = torch.rand(3, 1, 28, 28)
    out = model(x)
    assert torch.equal(out.logits.argmax(1), out.distances.argmin(1))  # nearest prototype wins
    assert class_identities(model.last_layer.weight) == list(range(10))
    with pytest.raises(Exception, match="n_prototypes == n_classes"):
        Config.from_dict({"model": {"fixed_identity_weights": True}})
