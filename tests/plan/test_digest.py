"""Plan digest: stable across processes and key order, sensitive to every planned quantity."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_ft.config import Recipe
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import diff_records, resolve_plan
from tests.conftest import CONFIGS

BASE: dict[str, Any] = yaml.safe_load((CONFIGS / "chestxray14_densenet121.yaml").read_text())


def _digest(recipe: Recipe) -> str:
    return resolve_plan(recipe, fast_model_spec(recipe.model)).digest


def test_digest_is_equal_in_two_separate_processes(tmp_path: Path) -> None:
    code = (
        "from dist_ft.config import load_recipe\n"
        "from dist_ft.models.spec import model_spec\n"
        "from dist_ft.plan import resolve_plan\n"
        "r = load_recipe({!r})\n"
        "print(resolve_plan(r, model_spec(r.model)).digest)\n"
    ).format(str(CONFIGS / "chestxray14_densenet121.yaml"))
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(digests) == 1 and digests.pop().startswith("sha256:")


def test_digest_ignores_yaml_key_order(recipe_factory: Callable[..., Recipe]) -> None:
    def reorder(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reorder(node[k]) for k in reversed(list(node))}
        if isinstance(node, list):
            return [reorder(v) for v in node]
        return node

    assert _digest(recipe_factory(BASE)) == _digest(recipe_factory(reorder(BASE)))


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0.002",
        "optim.groups[1].lr_scale=0.2",
        "optim.weight_decay=0.001",
        "optim.groups[2].weight_decay=0.0",
        "plan.stages[1].include=[head, {last_blocks: 2}]",
        "plan.stages[0].exclude=[classifier.bias]",
        "plan.bn_policy=train",
        "plan.stages[2].bn_policy=train",
        "plan.stages[1].lr_scale=0.5",
        "plan.stages[2].start_epoch=5",
        "optim.no_decay_1d=false",
        "model.num_classes=15",
    ],
)
def test_digest_changes_with_any_planned_quantity(
    recipe_factory: Callable[..., Recipe], override: str
) -> None:
    assert _digest(recipe_factory(BASE)) != _digest(recipe_factory(BASE, override))


def test_digest_ignores_what_the_plan_does_not_depend_on(
    recipe_factory: Callable[..., Recipe],
) -> None:
    base = _digest(recipe_factory(BASE))
    assert base == _digest(recipe_factory(BASE, "trainer.epochs=3", "data.batch_size=8"))


def test_diff_names_the_first_differing_parameters(recipe_factory: Callable[..., Recipe]) -> None:
    a_recipe = recipe_factory(BASE)
    b_recipe = recipe_factory(BASE, "plan.stages[0].include=[head, features.norm5]")
    spec = fast_model_spec(a_recipe.model)
    a = resolve_plan(a_recipe, spec).records()
    b = resolve_plan(b_recipe, spec).records()
    diffs = diff_records(a, b, limit=3)
    assert diffs[0].startswith("stage 0 'head': features.norm5.bias: trainable False != True")
    assert diffs[1].startswith("stage 0 'head': features.norm5.weight: trainable")
    assert len(diffs) == 2  # only norm5 changed
    assert diff_records(a, json.loads(json.dumps(a))) == []
