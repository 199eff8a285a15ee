"""The training family table: every family is complete, agrees with the bundle schema and the
torch-free registry, and a verb a family lacks is refused with one line."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import tiny_config_dict, tiny_protopnet_dict

from bundle.families import FAMILIES as SERVING_FAMILIES
from training.config import Config
from training.families import FAMILIES, FamilyError, family, family_of


def test_both_tables_and_the_bundle_schema_name_the_same_families():
    assert set(FAMILIES) == set(SERVING_FAMILIES)


@pytest.mark.parametrize("name,raw", [("prototypedl", tiny_config_dict()), ("protopnet", tiny_protopnet_dict())])
def test_a_built_model_exports_what_its_bundle_must_hold(name, raw):
    config = Config.from_dict(raw, source="test")
    entry = family(name)
    model = entry.build(config.model, False).eval()
    assert family_of(model) is entry
    outputs = entry.graph_outputs(model)
    assert set(SERVING_FAMILIES[name].outputs) <= set(outputs)
    image = torch.rand(2, config.model.in_channels, config.model.input_size, config.model.input_size)
    with torch.no_grad():
        values = entry.graph_forward(model, image)
    assert len(values) == len(outputs)
    for (output, shape), value in zip(outputs.items(), values, strict=True):
        assert list(value.shape) == [2, *shape[1:]], output
    assert (entry.decoder(model) is not None) == SERVING_FAMILIES[name].has_decoder
    assert isinstance(entry.trainer, type) and callable(entry.evaluate)


def test_an_unknown_family_is_named():
    with pytest.raises(FamilyError, match="unknown model family 'pipnet' .*known: prototypedl, protopnet"):
        family("pipnet")


def test_visualize_refuses_a_family_without_checkpoint_pictures(tiny_protopnet_checkpoint, tmp_path):
    from training.visualize import visualize_checkpoint

    with pytest.raises(FamilyError, match="protopnet has no pictures to draw .* push/epoch_NNNN/"):
        visualize_checkpoint(tiny_protopnet_checkpoint, tmp_path / "pics")
