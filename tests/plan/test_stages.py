"""Freeze stages: each stage's trainable set and groups equal what the YAML says.

Expected sets are counted from the module tree of a real (random-init) model, a different
code path from the engine's name/block matching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import yaml
from torch import nn
from torchvision.models import get_model

from dist_ft.config import Recipe
from dist_ft.models.spec import describe_model
from dist_ft.plan import ResolvedPlan, resolve_plan
from tests.conftest import CONFIGS


def _names(model: nn.Module, modules: Iterable[nn.Module]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for m in modules for p in m.parameters()}


def _plan(recipe: Recipe, model: nn.Module) -> ResolvedPlan:
    return resolve_plan(recipe, describe_model(model, recipe.model.name))


def _groups(plan: ResolvedPlan, stage: int) -> dict[str, set[str]]:
    return {g.name: set(g.params) for g in plan.stages[stage].groups}


def test_densenet121_chexnet_three_stage_plan(recipe_factory: Callable[..., Recipe]) -> None:
    data = yaml.safe_load((CONFIGS / "chestxray14_densenet121.yaml").read_text())
    recipe = recipe_factory(data, "model.pretrained=none")
    model = get_model("densenet121", weights=None, num_classes=14)
    plan = _plan(recipe, model)
    f = model.features
    head = _names(model, [model.classifier])
    top = _names(model, [f.denseblock4, f.norm5])
    everything = _names(model, [model])

    assert [s.name for s in plan.stages] == ["head", "last_block", "full"]
    assert [s.start for s in plan.stages] == [{"epoch": 0}, {"epoch": 2}, {"epoch": 4}]
    assert set(plan.stages[0].trainable) == head
    assert set(plan.stages[1].trainable) == head | top
    assert set(plan.stages[2].trainable) == everything

    # Groups: head at lr, denseblock4+norm5 at lr/10, the rest at lr/100; 1-D params no decay.
    one_d = {n for n, p in model.named_parameters() if p.ndim <= 1}
    lr = recipe.optim.lr
    want = {
        "head": (head - one_d, lr, 1e-4),
        "head.no_decay": (head & one_d, lr, 0.0),
        "top": (top - one_d, lr * 0.1, 1e-4),
        "top.no_decay": (top & one_d, lr * 0.1, 0.0),
        "backbone": (everything - head - top - one_d, lr * 0.01, 1e-4),
        "backbone.no_decay": ((everything - head - top) & one_d, lr * 0.01, 0.0),
    }
    for stage, names in [(0, ["head", "head.no_decay"]), (1, list(want)[:4]), (2, list(want))]:
        groups = {g.name: g for g in plan.stages[stage].groups}
        assert set(groups) == set(names), stage
        for name in names:
            params, group_lr, decay = want[name]
            assert set(groups[name].params) == params, (stage, name)
            assert groups[name].lr == pytest.approx(group_lr)
            assert groups[name].weight_decay == decay
    assert plan.stages[0].pruned_groups == ("top", "backbone")

    # BatchNorm policy: frozen BN layers are exactly those outside the trainable modules.
    bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    top_bn = {n for n in bn if n.startswith(("features.denseblock4.", "features.norm5"))}
    assert set(plan.stages[0].bn_eval) == bn
    assert set(plan.stages[1].bn_eval) == bn - top_bn
    assert plan.stages[2].bn_eval == ()


def test_resnet50_from_block_exclude_and_bn_train(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "resnet50", "num_classes": 3},
        "plan": {"stages": [
            {"name": "fc", "start_step": 0, "include": ["head"]},
            {"name": "top", "start_step": 100, "include": [{"from_block": "layer3"}],
             "exclude": ["layer3.0"], "lr_scale": 0.5},
            {"name": "all_bn_train", "start_step": 500, "include": ["all"],
             "exclude": [{"regex": r"^(conv1|bn1)\."}], "bn_policy": "train"},
        ]},
        "optim": {"lr": 0.1, "weight_decay": 0.01, "groups": [
            {"name": "late", "match": [{"blocks": ["layer4"]}], "lr_scale": 0.5},
            {"name": "early", "match": ["layer[123]*"], "lr": 0.001},
        ]},
    })
    model = get_model("resnet50", weights=None, num_classes=3)
    plan = _plan(recipe, model)
    fc = _names(model, [model.fc])
    top = _names(model, [*list(model.layer3)[1:], model.layer4, model.fc])
    stem = _names(model, [model.conv1, model.bn1])
    assert set(plan.stages[0].trainable) == fc
    assert set(plan.stages[1].trainable) == top
    assert set(plan.stages[2].trainable) == _names(model, [model]) - stem

    groups = {g.name: g for g in plan.stages[1].groups}
    layer4 = _names(model, [model.layer4])
    layer3 = _names(model, list(model.layer3)[1:])
    assert set(groups["late"].params) | set(groups["late.no_decay"].params) == layer4
    # Stage lr_scale 0.5 multiplies every group: late = 0.1*0.5*0.5, early = 0.001*0.5.
    assert groups["late"].lr == pytest.approx(0.025)
    assert groups["early"].lr == pytest.approx(0.0005)
    assert set(groups["early"].params) | set(groups["early.no_decay"].params) == layer3
    assert groups["default"].lr == pytest.approx(0.05)

    assert plan.stages[2].bn_policy == "train" and plan.stages[2].bn_eval == ()
    assert plan.stages[2].frozen_norms == ("bn1",)
    assert plan.stage_at(epoch=9, step=99).name == "fc"
    assert plan.stage_at(epoch=0, step=100).name == "top"
    assert plan.stage_at(epoch=0, step=10_000).name == "all_bn_train"


def test_vit_b_16_last_blocks(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "vit_b_16", "num_classes": 14},
        "plan": {"stages": [
            {"name": "head", "include": ["head"]},
            {"name": "last2", "start_epoch": 1, "include": ["head", {"last_blocks": 2}]},
            {"name": "no_embed", "start_epoch": 2, "include": ["all"], "exclude": ["stem"]},
        ]},
    })
    model = get_model("vit_b_16", weights=None, num_classes=14)
    plan = _plan(recipe, model)
    enc = model.encoder
    heads = _names(model, [model.heads])
    assert set(plan.stages[0].trainable) == heads
    assert set(plan.stages[1].trainable) == heads | _names(
        model, [enc.layers[-2], enc.layers[-1], enc.ln]
    )
    stem = _names(model, [model.conv_proj]) | {"class_token", "encoder.pos_embedding"}
    assert set(plan.stages[2].trainable) == _names(model, [model]) - stem
    assert plan.stages[0].frozen_norms == ()  # LayerNorm has no running statistics
