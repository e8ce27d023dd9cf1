"""Adapter stages in a plan: targets, trainable sets, digests, and shapes as peft makes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_ft.config import load_recipe
from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import ModelConfig
from dist_ft.models.adapters import adapt
from dist_ft.models.factory import build_model
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import resolve_plan
from tests.conftest import CONFIGS

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def _plan(stages: str, *overrides: str, path: Path = SMOKE):
    recipe = load_recipe(path, [f"plan.stages={stages}", *overrides])
    return resolve_plan(recipe, fast_model_spec(recipe.model))


LORA = ("[{name: head, start_step: 0, include: [head]}, "
        "{name: lora, start_step: 2, include: [head], "
        "adapters: {r: 4, alpha: 8, target: [{last_blocks: 2}, conv2]}}, "
        "{name: full, start_step: 4, include: [all]}]")


def test_targets_narrow_and_only_adapters_and_included_weights_train() -> None:
    plan = _plan(LORA)
    lora = plan.stages[1]
    assert lora.adapters is not None
    assert lora.adapters.modules == ("layer3.0.conv2", "layer3.1.conv2", "layer4.0.conv2",
                                     "layer4.1.conv2")
    adapter = [n for n in lora.trainable if ".lora_" in n]
    assert len(adapter) == 8 and not [n for n in lora.trainable if "base_layer" in n]
    assert set(lora.trainable) - set(adapter) == {"fc.weight", "fc.bias"}
    # Two tensors per wrapped layer: A (r x in x 3 x 3) and B (out x r x 1 x 1).
    shapes = {p.name: p.shape for p in lora.spec.params}
    assert shapes["layer4.1.conv2.lora_A.default.weight"] == (4, 512, 3, 3)
    assert shapes["layer4.1.conv2.lora_B.default.weight"] == (512, 4, 1, 1)
    assert lora.adapter_params == sum(
        4 * c * 9 + c * 4 for c in (256, 256, 512, 512))
    assert lora.frozen_params == plan.spec.num_params - 14 * 512 - 14
    assert plan.stages[2].adapters is None and plan.stages[2].spec is plan.spec
    # Entering "full", the merged layers' weights differ from the initial ones; so do fc's.
    changed = plan.changed_before(2)
    assert "layer4.1.conv2.weight" in changed and "fc.weight" in changed
    assert "layer1.0.conv1.weight" not in changed and plan.changed_before(1) == (
        "fc.weight", "fc.bias")


def test_the_digest_covers_the_adapters() -> None:
    base = _plan(LORA).digest
    assert _plan(LORA.replace("r: 4", "r: 8")).digest != base
    assert _plan(LORA.replace("alpha: 8", "alpha: 4")).digest != base
    assert _plan(LORA.replace("r: 4,", "r: 4, kind: dora,")).digest != base
    assert _plan(LORA).digest == base


@pytest.mark.parametrize(("target", "said"), [
    ("[conv9]", "'conv9' matched no layer of resnet18; did you mean 'conv2'?"),
    ("[{blocks: [layer5]}]", "resnet18 has no block 'layer5'; did you mean 'layer4'?"),
    ("[{blocks: [layer1]}, fc]", "together select no layer"),
    ("[bn1]", "'bn1' matched no layer of resnet18"),
    ("[{regex: 'bn'}]", "'regex: bn' selects no weight layer of resnet18"),
])
def test_bad_targets_are_named(target: str, said: str) -> None:
    stages = f"[{{name: lora, start_step: 0, adapters: {{target: {target}}}}}]"
    with pytest.raises(ConfigError) as info:
        _plan(stages)
    text = str(info.value)
    assert "plan.stages[0].adapters.target" in text and said in text, text


def test_torchvision_vit_attention_cannot_be_adapted_and_says_why() -> None:
    """torchvision's MultiheadAttention keeps q, k, v in one in_proj_weight (no Linear) and
    reads its out_proj's weight directly, past any wrapper: an adapter there never trains."""
    vit = ("model.name=vit_b_16", "data.image_size=224")
    with pytest.raises(ConfigError) as info:
        _plan("[{name: lora, start_step: 0, adapters: {target: [self_attention]}}]", *vit)
    assert "inside torch's MultiheadAttention" in str(info.value)
    # A broad target keeps the MLP's Linear layers and leaves out_proj out.
    plan = _plan("[{name: lora, start_step: 0, include: [head], adapters: {r: 8, target: "
                 "[{glob: encoder.layers}, {regex: 'out_proj|mlp'}]}}]", *vit)
    modules = plan.stages[0].adapters.modules
    assert len(modules) == 24 and not [m for m in modules if "out_proj" in m]
    # 12 blocks x mlp (768 -> 3072 -> 768) at r=8, plus the 14-class head.
    assert plan.stages[0].trainable_params == 12 * 8 * 2 * (768 + 3072) + 768 * 14 + 14


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_planned_shapes_are_what_peft_injects(kind: str) -> None:
    """The stage's description comes from peft itself: a live injection has the same tensors."""
    plan = _plan(LORA.replace("r: 4,", f"r: 4, kind: {kind},"))
    stage = plan.stages[1]
    model = adapt(build_model(ModelConfig(name="resnet18", num_classes=14)), None, stage.adapters)
    live = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert live == {p.name: p.shape for p in stage.spec.params}
    torch.manual_seed(0)
    assert {n for n in live if ".base_layer." in n} == {
        f"{m}.base_layer.weight" for m in stage.adapters.modules}


def test_grouped_convolutions_and_wrapped_includes_are_refused() -> None:
    # ConvNeXt's depthwise 7x7 convolutions: peft can neither adapt nor merge them well.
    plan = _plan("[{name: l, start_step: 0, adapters: {target: [{last_blocks: 1}]}}]",
                 "model.name=convnext_tiny")
    kinds = {la.name: la.kind for la in plan.spec.layers}
    assert kinds["features.7.0.block.0"] == "GroupedConv2d"
    assert {kinds[m] for m in plan.stages[0].adapters.modules} == {"Linear"}
    with pytest.raises(ConfigError) as info:
        _plan("[{name: l, start_step: 0, adapters: {target: ['features.7.0.block.0']}}]",
              "model.name=convnext_tiny")
    assert "GroupedConv2d" in str(info.value)
    # A weight both trained (include) and wrapped (target) is a contradiction: named.
    with pytest.raises(ConfigError) as info:
        _plan("[{name: l, start_step: 0, include: [head], adapters: {target: [head]}}]")
    assert "include selects fc.base_layer.bias, fc.base_layer.weight" in str(info.value)
