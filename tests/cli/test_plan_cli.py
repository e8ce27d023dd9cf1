"""``dist-ft plan`` through the command line: output shapes and bad-recipe errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CONFIGS, CliResult

DENSENET = str(CONFIGS / "chestxray14_densenet121.yaml")


def test_plan_json_has_the_documented_shape(run_cli: Callable[..., CliResult]) -> None:
    result = run_cli("plan", DENSENET, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["model"] == "densenet121"
    assert doc["digest"].startswith("sha256:") and len(doc["digest"]) == 71
    assert [s["name"] for s in doc["stages"]] == ["head", "last_block", "full"]
    for stage in doc["stages"]:
        assert isinstance(stage["trainable_params"], int)
        assert isinstance(stage["frozen_params"], int)
        assert stage["trainable_params"] + stage["frozen_params"] == doc["num_params"]
        assert stage["trainable_params"] == sum(g["num_params"] for g in stage["groups"])
        for group in stage["groups"]:
            assert set(group) >= {"name", "lr", "weight_decay", "num_params"}
            assert isinstance(group["lr"], float) and isinstance(group["weight_decay"], float)
    assert doc["stages"][0]["trainable_params"] == 1024 * 14 + 14
    assert doc["stages"][2]["frozen_params"] == 0


def test_plan_table_shows_groups_bn_and_digest(run_cli: Callable[..., CliResult]) -> None:
    result = run_cli("plan", DENSENET, "optim.lr=3e-4", "--params")
    assert result.code == 0, result.err
    doc = json.loads(run_cli("plan", DENSENET, "optim.lr=3e-4", "--json").out)
    out = result.out
    assert "stage 2/3 · last_block · from epoch 2" in out
    assert "top.no_decay" in out and "3e-05" in out
    assert "BatchNorm in eval mode (frozen stats): 121 layers" in out
    assert "features.denseblock4.denselayer16.conv2.weight" in out  # --params lists them
    assert doc["digest"] in out


def test_plan_json_params_lists_each_parameter_per_stage(
    run_cli: Callable[..., CliResult],
) -> None:
    doc = json.loads(run_cli("plan", DENSENET, "--json", "--params").out)
    rows = {r["name"]: r for r in doc["params"]}
    assert rows["classifier.weight"]["stages"] == ["head", "head", "head"]
    assert rows["features.conv0.weight"]["stages"] == [None, None, "backbone"]
    assert rows["features.norm5.bias"]["block"] == "denseblock4"


def test_console_script_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "plan", str(CONFIGS / "imagefolder_resnet18.yaml"),
         "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "resnet18"


BASE: dict[str, Any] = {
    "model": {"name": "densenet121"},
    "plan": {"stages": [
        {"name": "head", "start_epoch": 0, "include": ["head"]},
        {"name": "top", "start_epoch": 2, "include": ["head", {"last_blocks": 1}]},
    ]},
    "optim": {"lr": 1e-3, "groups": [{"name": "top", "match": [{"blocks": ["denseblock4"]}],
                                      "lr_scale": 0.1}]},
}


def _stage(i: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d["plan"]["stages"][i].update(fields)
    return edit


# (id, edit of BASE or overrides, text that must appear in the error)
BAD_RECIPES: list[tuple[str, Any, list[str]]] = [
    ("unknown_section", lambda d: d.update(optimizer={}),
     ["optimizer: unknown key", "did you mean 'optim'"]),
    ("near_miss_key", ["optim.lrr=0.1"], ["optim.lrr: unknown key", "did you mean 'lr'"]),
    ("near_miss_stage_key", _stage(1, inclde=["head"]),
     ["plan.stages[1].inclde: unknown key", "did you mean 'include'"]),
    ("pattern_matches_nothing", _stage(1, include=["features.denseblock9*"]),
     ["plan.stages[1].include[0]", "'features.denseblock9*' matched no parameter of densenet121",
      "known prefixes"]),
    ("negative_lr", ["optim.lr=-0.001"], ["optim.lr", "greater than 0", "-0.001"]),
    ("stages_out_of_order", _stage(1, start_epoch=0), ["plan", "stages out of order", "top"]),
    ("unknown_model", ["model.name=densenet12"],
     ["model.name", "unknown model 'densenet12'", "did you mean 'densenet121'"]),
    ("wrong_type", ["trainer.epochs=abc"], ["trainer.epochs", "valid integer", "'abc'"]),
    ("unknown_block", _stage(1, include=[{"from_block": "denseblock5"}]),
     ["plan.stages[1].include[0]", "no block 'denseblock5'", "did you mean 'denseblock4'"]),
    ("too_many_last_blocks", _stage(1, include=[{"last_blocks": 9}]),
     ["plan.stages[1].include[0]", "last_blocks: 9", "4 body blocks"]),
    ("bad_regex", _stage(0, include=[{"regex": "features.(conv"}]),
     ["plan.stages[0].include[0].regex", "invalid regular expression"]),
    ("two_rule_kinds", _stage(0, include=[{"glob": "head", "regex": "x"}]),
     ["plan.stages[0].include[0]", "exactly one of", "glob, regex"]),
    ("group_lr_and_scale", ["optim.groups[0].lr=0.1"], ["optim.groups[0]", "lr or lr_scale"]),
    ("duplicate_stage_names", _stage(1, name="head"), ["plan", "stage names must be unique"]),
    ("missing_model", lambda d: d.pop("model"), ["model: required key is missing"]),
    ("bad_bn_policy", ["plan.bn_policy=frozen"], ["plan.bn_policy", "'freeze' or 'train'"]),
    ("layer_decay_above_one", ["optim.layer_decay=1.5"], ["optim.layer_decay", "1.5"]),
    ("malformed_override", ["optim.lr"], ["override 'optim.lr'", "expected KEY=VALUE"]),
    ("exclude_everything", _stage(0, exclude=["all"]),
     ["plan.stages[0] (head)", "exclude removes every parameter"]),
    ("group_matches_nothing", ["optim.groups[0].match=[layer4]"],
     ["optim.groups[0].match[0]", "'layer4' matched no parameter"]),
    ("stage_without_start", lambda d: d["plan"]["stages"][1].pop("start_epoch"),
     ["stages[1] (top): set start_epoch or start_step"]),
    ("mixed_start_units",
     lambda d: d["plan"]["stages"].append({"name": "all", "start_step": 900, "include": ["all"]}),
     ["plan", "start_epoch in every stage or start_step in every stage"]),
    ("rule_of_wrong_type", _stage(0, include=[3]), ["plan.stages[0].include[0]", "a rule is"]),
    ("empty_include", _stage(0, include=[]), ["plan.stages[0].include", "at least one rule"]),
    ("negative_weight_decay", ["optim.weight_decay=-1"],
     ["optim.weight_decay", "must be greater than or equal to 0", "-1"]),
    ("zero_classes", ["model.num_classes=0"],
     ["model.num_classes", "must be greater than or equal to 1"]),
    ("bad_time_format", ["launch.time=2h"], ["launch.time", "'2h'"]),
    ("index_out_of_range", ["plan.stages[7].lr_scale=2"], ["plan.stages has 2 items, no [7]"]),
    ("reserved_group_name", ["optim.groups[0].name=default"], ["optim", "'default' is reserved"]),
]


@pytest.mark.parametrize(("edit", "expected"), [(e, x) for _, e, x in BAD_RECIPES],
                         ids=[i for i, _, _ in BAD_RECIPES])
def test_bad_recipe_fails_naming_the_key(
    run_cli: Callable[..., CliResult],
    write_recipe: Callable[[dict[str, Any]], Path],
    edit: Any,
    expected: list[str],
) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    overrides: list[str] = []
    if callable(edit):
        edit(data)
    else:
        overrides = edit
    path = write_recipe(data)
    result = run_cli("plan", str(path), *overrides, "--json")
    assert result.code == 2, result.err
    assert result.out == ""  # nothing on stdout: --json consumers see no half document
    assert str(path) in result.err
    for text in expected:
        assert text in result.err, f"{text!r} not in:\n{result.err}"


def test_missing_and_invalid_yaml_files(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    missing = run_cli("plan", str(tmp_path / "nope.yaml"))
    assert missing.code == 2 and "nope.yaml: invalid recipe" in missing.err
    assert "cannot read recipe" in missing.err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {name: resnet18\n")
    result = run_cli("plan", str(broken))
    assert result.code == 2 and "not valid YAML" in result.err and "line" in result.err
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: {name: resnet18}\noptim: {lr: 0.1}\noptim: {lr: 0.2}\n")
    result = run_cli("plan", str(dup))
    assert result.code == 2 and "duplicate key 'optim'" in result.err


def test_usage_error_exits_2(run_cli: Callable[..., CliResult]) -> None:
    assert run_cli("plan").code == 2
