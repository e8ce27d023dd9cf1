"""Block maps: every parameter of every supported architecture lands in one ordered block."""

from __future__ import annotations

import pytest

from dist_ft.config.architectures import ARCHITECTURES, family_of
from dist_ft.config.schema import ModelConfig
from dist_ft.models.blocks import HEAD, STEM, resolve_block_map
from dist_ft.models.spec import model_spec
from dist_ft.models.spec_cache import shipped_spec, spec_to_json, torchvision_version


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_block_map_covers_every_parameter_in_order(name: str) -> None:
    spec = model_spec(ModelConfig(name=name, num_classes=3))
    bm = spec.blocks
    assert set(bm.block_of) == {p.name for p in spec.params}
    assert bm.blocks[0] == STEM and bm.blocks[-1] == HEAD and len(bm.body) >= 4
    # Blocks appear in forward order: the block index never decreases along the parameters.
    indices = [bm.index(bm.block_of[p.name]) for p in spec.params]
    assert indices == sorted(indices)
    head = family_of(name).head
    assert [p.name for p in spec.params if bm.block_of[p.name] == HEAD] == [
        f"{head}.weight", f"{head}.bias"
    ]
    assert spec.params[-2].shape[0] == 3  # the classifier was sized for num_classes


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shipped_spec_matches_a_fresh_meta_build(name: str) -> None:
    cfg = ModelConfig(name=name, num_classes=7)
    shipped = shipped_spec(cfg)
    if shipped is None:
        pytest.skip(f"no shipped spec for torchvision {torchvision_version()}")
    assert spec_to_json(shipped) == spec_to_json(model_spec(cfg))
    assert shipped.blocks == model_spec(cfg).blocks


def test_final_norms_join_the_last_body_block() -> None:
    bm = model_spec(ModelConfig(name="densenet121")).blocks
    assert bm.block_of["features.norm5.weight"] == "denseblock4"
    assert bm.block_of["features.transition3.conv.weight"] == "denseblock3"
    vit = model_spec(ModelConfig(name="vit_b_16")).blocks
    assert vit.block_of["encoder.ln.weight"] == "encoder_layer_11"
    assert vit.block_of["class_token"] == STEM


def test_unknown_parameter_is_reported() -> None:
    with pytest.raises(ValueError, match=r"no rule for parameter 'extra\.weight'"):
        resolve_block_map("resnet", ["conv1.weight", "extra.weight"])
