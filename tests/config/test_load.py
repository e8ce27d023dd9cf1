"""Recipe loading: YAML, overrides, validation messages, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_ft.config import ConfigError, load_recipe
from dist_ft.config.load import apply_overrides, parse_yaml, split_key
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import resolve_plan

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_resolves(path: Path) -> None:
    recipe = load_recipe(path)
    plan = resolve_plan(recipe, fast_model_spec(recipe.model))
    assert plan.stages and plan.digest.startswith("sha256:")


def test_shipped_recipes_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"chestxray14_densenet121.yaml", "imagefolder_resnet18.yaml"} <= names


def test_overrides_parse_values_as_yaml_and_reach_lists(tmp_path: Path) -> None:
    src = CONFIGS[0].parent / "chestxray14_densenet121.yaml"
    recipe = load_recipe(
        src,
        [
            "optim.lr=3e-4",
            "trainer.epochs=5",
            "plan.stages[1].lr_scale=0.5",
            "plan.stages.2.bn_policy=train",
            "data.views=[PA]",
        ],
    )
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert isinstance(recipe.optim.lr, float)
    assert recipe.trainer.epochs == 5
    assert recipe.plan.stages[1].lr_scale == 0.5
    assert recipe.plan.stages[2].bn_policy == "train"
    assert recipe.data.views == ["PA"]


def test_exponent_floats_without_dot_are_floats() -> None:
    assert parse_yaml("lr: 3e-4") == {"lr": 3e-4}
    assert parse_yaml("lr: 1.0e-3") == {"lr": 1e-3}
    assert parse_yaml("name: e5") == {"name": "e5"}


def test_duplicate_yaml_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        parse_yaml("optim:\n  lr: 1\n  lr: 2\n")


def test_split_key_accepts_both_index_styles() -> None:
    assert split_key("plan.stages[1].include") == ["plan", "stages", 1, "include"]
    assert split_key("plan.stages.1.include") == ["plan", "stages", 1, "include"]


def test_override_problems_are_reported_not_raised() -> None:
    data = {"optim": {"lr": 1.0}, "plan": {"stages": [{"name": "a"}]}}
    problems = apply_overrides(data, ["optim.lr", "optim.lr.x=1", "plan.stages[5].name=b"])
    assert len(problems) == 3
    assert "expected KEY=VALUE" in problems[0]
    assert "optim.lr is 1.0, not a mapping" in problems[1]
    assert "plan.stages has 1 items, no [5]" in problems[2]


def test_all_problems_are_collected_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {name: resnet18}\noptim: {lr: -1, weigth_decay: 0.1}\ntrainer: {epochs: 0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "optim.lr" in text and "optim.weigth_decay" in text and "trainer.epochs" in text
    assert "did you mean 'weight_decay'" in text
    assert str(path) in text


def test_recipe_is_immutable() -> None:
    recipe = load_recipe(CONFIGS[0])
    with pytest.raises(Exception, match="frozen"):
        recipe.optim.lr = 1.0  # type: ignore[misc]
