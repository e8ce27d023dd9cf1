"""Parameter groups: layer-wise lr decay, no decay on 1-D parameters, pruning and merging."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torchvision.models import get_model

from dist_ft.config import Recipe
from dist_ft.models.spec import describe_model
from dist_ft.plan import resolve_plan


def _lr_of(plan, stage: int = 0) -> dict[str, float]:
    return {p: g.lr for g in plan.stages[stage].groups for p in g.params}


def test_layer_decay_on_vit(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "vit_b_16"},
        "optim": {"lr": 1e-3, "layer_decay": 0.75},
    })
    model = get_model("vit_b_16", weights=None, num_classes=14)
    plan = resolve_plan(recipe, describe_model(model, "vit_b_16"))
    lrs = _lr_of(plan)
    # Block index from the module tree: stem 0, encoder layer i -> i + 1, head = depth.
    layers = list(model.encoder.layers)
    depth = len(layers) + 1
    by_id = {id(p): n for n, p in model.named_parameters()}
    expected: dict[str, int] = {"class_token": 0, "encoder.pos_embedding": 0}
    expected.update({by_id[id(p)]: 0 for p in model.conv_proj.parameters()})
    for i, layer in enumerate(layers):
        expected.update({by_id[id(p)]: i + 1 for p in layer.parameters()})
    expected.update({by_id[id(p)]: len(layers) for p in model.encoder.ln.parameters()})
    expected.update({by_id[id(p)]: depth for p in model.heads.parameters()})
    assert set(expected) == set(lrs)
    for name, k in expected.items():
        assert lrs[name] == pytest.approx(1e-3 * 0.75 ** (depth - k)), name


def test_layer_decay_on_densenet(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "densenet121"},
        "optim": {"lr": 0.01, "layer_decay": 0.5},
    })
    model = get_model("densenet121", weights=None, num_classes=14)
    plan = resolve_plan(recipe, describe_model(model, "densenet121"))
    lrs = _lr_of(plan)
    f = model.features
    by_id = {id(p): n for n, p in model.named_parameters()}
    blocks = [
        [f.conv0, f.norm0],
        [f.denseblock1, f.transition1],
        [f.denseblock2, f.transition2],
        [f.denseblock3, f.transition3],
        [f.denseblock4, f.norm5],
        [model.classifier],
    ]
    depth = len(blocks) - 1
    for k, modules in enumerate(blocks):
        for m in modules:
            for p in m.parameters():
                assert lrs[by_id[id(p)]] == pytest.approx(0.01 * 0.5 ** (depth - k))
    assert plan.stages[0].groups[0].name == "default.stem"


def test_one_d_params_have_no_decay_by_default_and_the_switch_turns_it_off(
    recipe_factory: Callable[..., Recipe],
) -> None:
    base = {"model": {"name": "convnext_tiny"}, "optim": {"weight_decay": 0.05}}
    model = get_model("convnext_tiny", weights=None, num_classes=14)
    spec = describe_model(model, "convnext_tiny")
    shapes = {n: p.ndim for n, p in model.named_parameters()}

    plan = resolve_plan(recipe_factory(base), spec)
    decay = {p: g.weight_decay for g in plan.stages[0].groups for p in g.params}
    for name, ndim in shapes.items():
        assert decay[name] == (0.0 if ndim <= 1 else 0.05), name
    assert {g.name for g in plan.stages[0].groups} == {"default", "default.no_decay"}

    off = resolve_plan(recipe_factory(base, "optim.no_decay_1d=false"), spec)
    assert [g.name for g in off.stages[0].groups] == ["default"]
    assert off.stages[0].groups[0].weight_decay == 0.05


def test_identical_groups_merge_and_empty_groups_are_pruned(
    recipe_factory: Callable[..., Recipe],
) -> None:
    recipe = recipe_factory({
        "model": {"name": "resnet18"},
        "plan": {"stages": [{"name": "top", "include": ["layer4", "head"]}]},
        "optim": {"lr": 0.1, "no_decay_1d": False, "groups": [
            {"name": "fc", "match": ["head"], "lr_scale": 1.0},  # same as default -> merged
            {"name": "early", "match": ["layer1"], "lr_scale": 0.1},  # all frozen -> pruned
        ]},
    })
    model = get_model("resnet18", weights=None)
    plan = resolve_plan(recipe, describe_model(model, "resnet18"))
    stage = plan.stages[0]
    assert [g.name for g in stage.groups] == ["default+fc"]
    assert stage.pruned_groups == ("early",)
    assert set(stage.groups[0].params) == {
        n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))
    }
