"""Alg. 1 on a tiny Decoy-MNIST ProtoPNet: rounds reduce the non-object count, antitypes grow, and a
revision interrupted between rounds resumes to exactly the uninterrupted result."""

import pytest
import torch
from tiny_configs import tiny_protopnet_dict

from registry.revision_settings import RevisionSettings
from revision.families import ObjectMasks
from revision.rounds import RevisionRun, simulated_consult
from training.checkpoint import load_checkpoint
from training.config import Config
from training.decoy_mnist import load_decoy_mnist
from training.splits import Split
from training.train_protopnet import ProtoPNetTrainer

SETTINGS = dict(rounds=2, epochs_per_round=1, batch_size=100, last_layer_epochs=1, eval_batch_size=500)


@pytest.fixture(scope="module")
def decoy_protopnet(tmp_path_factory, mnist_root):
    """A ProtoPNet trained for three short epochs on 600 Decoy-MNIST images, pushed at the end."""
    config = tiny_protopnet_dict()
    config["data"].update(dataset="decoy_mnist", train_subset=600)
    config["train"]["epochs"] = 3
    config["schedule"].update(push_start=3, push_every=3)
    out = tmp_path_factory.mktemp("decoy_protopnet")
    trainer = ProtoPNetTrainer(Config.from_dict(config), out, data_root=mnist_root, log=lambda s: None)
    trainer.fit()
    sets = load_decoy_mnist(mnist_root, 0, 200, 600)
    adversarial = sets["test_adversarial"].split()
    evals = {"val": trainer.data["val"], "test_adversarial": Split(adversarial.images[:300], adversarial.labels[:300])}
    return out / "last.pt", trainer.data, ObjectMasks.from_decoy(sets["train"]), evals


def _run(decoy_protopnet, out, consult=None, **overrides):
    checkpoint, data, masks, evals = decoy_protopnet
    model, config, _ = load_checkpoint(checkpoint)
    settings = RevisionSettings(**{**SETTINGS, **overrides})
    return RevisionRun(model, config, settings, data, out, consult or simulated_consult(), masks, evals,
                       log=lambda s: None)


@pytest.mark.slow
def test_rounds_reduce_the_non_object_count_and_grow_the_antitypes(tmp_path, decoy_protopnet):
    run = _run(decoy_protopnet, tmp_path)
    state = run.run()
    counts = [h["non_object"] for h in state.history]
    assert counts[0] > 0, "the tiny model should start with non-object prototypes"
    assert counts[-1] < counts[0]
    antitypes = [h["antitypes"] for h in state.history]
    assert antitypes == sorted(antitypes) and antitypes[-1] >= counts[0]
    assert state.history[1]["verdicts_given"] == counts[0]  # the user rejected exactly the non-object ones
    assert {a["round"] for a in state.antitypes} <= {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("freeze_encoder", [True, False])
def test_resume_between_rounds_is_exact(tmp_path, decoy_protopnet, freeze_encoder):
    from registry.verdicts import verdict
    from revision.rounds import file_consult

    def consult():  # a rejection in each round, so both rounds train
        return file_consult([verdict(0, "reject", 1, "tester"), verdict(1, "reject", 2, "tester")])

    settings = {"freeze_encoder": freeze_encoder}
    whole = _run(decoy_protopnet, tmp_path / "whole", consult(), **settings)
    whole.run()
    assert whole.state.round == 2  # both rounds trained
    first = _run(decoy_protopnet, tmp_path / "split", consult(), **settings)
    first.run(stop_after=1)
    assert first.state.round == 1 and not first.state.finished
    second = _run(decoy_protopnet, tmp_path / "split", consult(), **settings)
    second.resume()
    second.run()
    assert second.state.round == whole.state.round
    assert torch.equal(second.model.prototypes, whole.model.prototypes)
    assert torch.equal(second.model.last_layer.weight, whole.model.last_layer.weight)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in whole.state.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in second.state.history] == strip
    assert second.state.antitypes == whole.state.antitypes
    assert [a["source"][0] >= 0 for a in whole.state.antitypes] == [True, True]  # the patch each stands for
    stored = torch.tensor([a["vector"] for a in whole.state.antitypes])
    # Encoder trained: an antitype follows its patch through the changing encoder; frozen: it is the vector.
    assert torch.allclose(whole.antitype_tensor(), stored) == freeze_encoder


@pytest.mark.slow
def test_all_rounds_trains_on_after_a_round_that_rejects_nothing(tmp_path, decoy_protopnet):
    from registry.verdicts import verdict
    from revision.rounds import file_consult

    def consult():  # round 1 rejects prototype 0, round 2 rejects nothing
        return file_consult([verdict(0, "reject", 1, "tester"), verdict(0, "accept", 2, "tester")])

    stops = _run(decoy_protopnet, tmp_path / "stops", consult())
    assert stops.run().round == 1 and stops.state.finished  # converged: nothing left to revise
    goes_on = _run(decoy_protopnet, tmp_path / "all", consult(), all_rounds=True)
    state = goes_on.run()
    assert state.round == 2 and [h["verdicts_given"] for h in state.history] == [0, 1, 0]
    assert not torch.equal(goes_on.model.prototypes, stops.model.prototypes)  # round 2 trained on


def test_a_changed_revision_config_is_refused_on_resume(tmp_path, decoy_protopnet):
    _run(decoy_protopnet, tmp_path).run(stop_after=1)
    with pytest.raises(Exception, match="different revision config"):
        _run(decoy_protopnet, tmp_path, rounds=3).resume()


def test_a_state_written_before_a_setting_existed_resumes_with_its_default(tmp_path, decoy_protopnet):
    from revision.rounds import STATE_FILE
    from training.checkpoint import read_checkpoint

    _run(decoy_protopnet, tmp_path).run(stop_after=1)
    payload = read_checkpoint(tmp_path / STATE_FILE)
    del payload["revision"]["config"]["all_rounds"]  # as written before --all-rounds existed
    torch.save(payload, tmp_path / STATE_FILE)
    resumed = _run(decoy_protopnet, tmp_path)
    resumed.resume()
    assert resumed.state.round == 1
    with pytest.raises(Exception, match="different revision config"):  # its default is not what it asks for
        _run(decoy_protopnet, tmp_path, all_rounds=True).resume()


def test_prototypedl_rejected_prototypes_move_away_from_their_antitypes(tmp_path, tiny_checkpoint, mnist_root):
    from registry.verdicts import verdict
    from revision.refine import refine_cost
    from revision.rounds import file_consult
    from training.mnist import load_mnist

    model, config, _ = load_checkpoint(tiny_checkpoint)
    d = config.data
    data = load_mnist(mnist_root, d.dataset, d.val_size, d.split_seed, d.train_subset)
    rejected = [1, 4]
    start = model.prototypes.detach().clone()
    consult = file_consult([verdict(j, "reject", 1, "tester") for j in rejected])
    events = []
    settings = RevisionSettings(rounds=1, epochs_per_round=1, batch_size=100, last_layer_epochs=1)
    run = RevisionRun(model, config, settings, data, tmp_path, consult, eval_sets={"val": data["val"]},
                      log=lambda s: None, progress=events.append)
    state = run.run()
    assert [(e.round, e.rounds, e.epoch, e.epochs, e.stage) for e in events] == [(1, 1, 1, 1, "training"),
                                                                                (1, 1, 1, 1, "round done")]
    assert events[-1].eta_seconds == 0.0
    assert [a["prototype_id"] for a in state.antitypes] == rejected
    antitypes = torch.tensor([a["vector"] for a in state.antitypes])
    assert torch.equal(antitypes, start[rejected])  # antitypes are the rejected prototypes as they were
    moved = (model.prototypes.detach()[rejected] - antitypes).norm(dim=1)
    assert (moved > 0.1).all()
    assert float(refine_cost(model.prototypes.detach(), antitypes)) < float(refine_cost(start, antitypes))
    assert state.history[-1]["verdicts_given"] == 2 and state.history[-1]["masked"] == []


def test_prototypedl_with_the_encoder_trained_keeps_its_decoder(tmp_path, tiny_checkpoint, mnist_root):
    """The decoder draws what the person judged: it stays as it was while the encoder trains."""
    from registry.verdicts import verdict
    from revision.rounds import file_consult
    from training.mnist import load_mnist

    model, config, _ = load_checkpoint(tiny_checkpoint)
    d = config.data
    data = load_mnist(mnist_root, d.dataset, d.val_size, d.split_seed, d.train_subset)
    decoder = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    settings = RevisionSettings(rounds=1, epochs_per_round=1, batch_size=100, last_layer_epochs=1, freeze_encoder=False)
    RevisionRun(model, config, settings, data, tmp_path, file_consult([verdict(1, "reject", 1, "tester")]),
                eval_sets={"val": data["val"]}, log=lambda s: None).run()
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder.items())
    assert not all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())


def test_the_eta_is_the_time_per_epoch_times_the_epochs_left():
    from revision.rounds import eta_seconds

    assert eta_seconds(10.0, 0, 4) is None
    assert eta_seconds(10.0, 1, 4) == 30.0
    assert eta_seconds(10.0, 4, 4) == 0.0
