"""Trainer components without a process group: schedule, losses, metrics, stage groups."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.models import get_model

from dist_ft.config import Recipe
from dist_ft.config.schema import ScheduleConfig
from dist_ft.models.spec import describe_model
from dist_ft.plan import resolve_plan
from dist_ft.train.losses import FocalLoss, build_loss, pos_weight_from
from dist_ft.train.metrics import classification_metrics
from dist_ft.train.schedule import LrSchedule
from dist_ft.train.stages import (
    apply_trainable,
    build_optimizer,
    optimizer_groups,
    set_bn_modes,
    training_since,
)


def test_cosine_with_warmup() -> None:
    s = LrSchedule(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_scale=0.1), 104, 10)
    assert s.factor(0) == pytest.approx(1 / 5) and s.factor(3) == pytest.approx(4 / 5)
    assert s.factor(4) == pytest.approx(1.0)
    assert s.factor(54) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(104) == pytest.approx(0.1)


def test_step_and_plateau() -> None:
    step = LrSchedule(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), 100, 10)
    assert [step.factor(k) for k in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    plateau = LrSchedule(ScheduleConfig(name="plateau", plateau_patience=1, gamma=0.1), 100, 10)
    reduced = [plateau.observe(m) for m in (0.5, 0.6, 0.6, 0.6, 0.7)]
    assert reduced == [False, False, False, True, False]
    assert plateau.factor(50) == pytest.approx(0.1)
    clone = LrSchedule(ScheduleConfig(name="plateau"), 100, 10)
    clone.load_state_dict(plateau.state_dict())
    assert clone.factor(50) == plateau.factor(50)


def test_losses() -> None:
    targets = np.array([[1, 0], [1, 0], [0, 0], [1, 1]], dtype=np.float32)
    assert pos_weight_from(targets).tolist() == pytest.approx([1.0, 3.0])  # clipped at 1
    logits, y = torch.zeros(4, 2), torch.from_numpy(targets)
    bce = build_loss("bce", True, targets)(logits, y)
    assert float(bce) == pytest.approx(math.log(2))
    weighted = build_loss("bce_pos_weight", True, targets)(logits, y)
    assert float(weighted) > float(bce)
    focal = FocalLoss()(logits, y)
    assert 0 < float(focal) < float(bce)
    with pytest.raises(ValueError, match="ce needs single-label"):
        build_loss("ce", True, targets)
    with pytest.raises(ValueError, match="use ce here"):
        build_loss("bce", False, np.array([0, 1]))


def test_metrics_exact_auroc_and_accuracy() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.6]], dtype=np.float32)
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=np.int64)
    m = classification_metrics(scores, targets, True, ["a", "b"])
    assert m["auroc"]["a"] == pytest.approx(1.0)
    assert math.isnan(m["auroc"]["b"])  # no positives: undefined, left out of the mean
    assert m["auroc_mean"] == pytest.approx(1.0)
    single = classification_metrics(scores, np.array([0, 0, 1, 0]), False, ["a", "b"])
    assert single["accuracy"] == pytest.approx(0.75)


def test_groups_split_by_history_and_optimizer_lrs(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "resnet18", "num_classes": 3},
        "plan": {"stages": [
            {"name": "head", "start_step": 0, "include": ["head"]},
            {"name": "top", "start_step": 5, "include": ["head", "layer4"]},
        ]},
        "optim": {"name": "sgd", "lr": 0.1, "no_decay_1d": False, "weight_decay": 0.0,
                  "groups": [{"name": "net", "match": ["all"], "lr_scale": 0.5}]},
    })
    model = get_model("resnet18", weights=None, num_classes=3)
    plan = resolve_plan(recipe, describe_model(model, "resnet18"))
    since = training_since(plan, 1)
    assert since["fc.weight"] == 0 and since["layer4.0.conv1.weight"] == 1
    groups = optimizer_groups(plan, 1)
    assert [g.name for g in groups] == ["net@head", "net@top"]
    assert {n for g in groups for n in g.params} == set(plan.stages[1].trainable)

    # Plain SGD: every parameter moves by exactly lr_group x grad.
    apply_trainable(model, plan.stages[1])
    optimizer = build_optimizer(recipe.optim.model_copy(update={"momentum": 0.0}), model, groups)
    model.train()
    set_bn_modes(model, plan.stages[1])
    assert not model.bn1.training and model.layer4[0].bn1.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    assert set(grads) == set(plan.stages[1].trainable)
    for name, param in model.named_parameters():
        expected = before[name] - 0.05 * grads[name] if name in grads else before[name]
        assert torch.allclose(param, expected, atol=1e-7), name
