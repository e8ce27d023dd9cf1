"""``dist-ft recipes list|copy|show`` and shipped names in the commands that take a recipe."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_ft.cli.eval import ResolvedWeights, recipe_of
from dist_ft.cli.main import build_parser
from dist_ft.config import ConfigError, load_recipe, shipped_recipes
from dist_ft.config.shipped import shipped_files
from dist_ft.launch.sweep import load_sweep
from tests.conftest import CONFIGS, REPO

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder outside the repo, where the repo's relative paths do not exist."""
    monkeypatch.chdir(tmp_path)


def test_list_shows_every_shipped_file_with_model_backend_and_purpose(run_cli) -> None:
    result = run_cli("recipes", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    smoke = next(line for line in lines if line.split()[:1] == ["chestxray14_smoke"])
    assert smoke.split()[1:4] == ["resnet18", "DeepSpeed", "ZeRO-2"]
    assert "The README demo" in smoke
    chexnet = next(line for line in lines
                   if line.split()[:1] == ["chestxray14_densenet121_chexnet"])
    assert chexnet.split()[1:3] == ["densenet121", "DDP"]
    for item in shipped_files():
        assert any(line.split()[:1] == [item.name] and item.purpose in line for line in lines)
    assert any(line.startswith("sweeps") for line in lines)
    assert any(line.startswith("launch configs") for line in lines)


def test_list_json_for_scripts(run_cli) -> None:
    result = run_cli("recipes", "list", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert [r["name"] for r in doc["recipes"]] == [f.name for f in shipped_recipes()]
    assert {r["name"]: r["backend"] for r in doc["recipes"]}["imagefolder_resnet18"] == "DDP"
    sweep = doc["sweeps"][0]
    assert sweep["tasks"] == len(load_sweep(sweep["path"]).tasks)
    launch = {r["name"]: r for r in doc["launch_configs"]}
    assert launch["zero3_offload"]["backend"] == "DeepSpeed ZeRO-3, offload to cpu"
    assert (launch["multinode"]["processes"], launch["multinode"]["machines"]) == (16, 2)
    assert launch["cpu_2proc"]["path"] == str(REPO / "launch" / "cpu_2proc.yaml")


def test_copy_writes_an_editable_copy_and_never_overwrites_unasked(
        run_cli, tmp_path: Path) -> None:
    result = run_cli("recipes", "copy", "chestxray14_smoke")
    target = tmp_path / "chestxray14_smoke.yaml"
    assert result.code == 0, result.err
    assert f"wrote {target}" in result.out
    assert target.read_bytes() == SMOKE.read_bytes()
    target.write_text("# mine\n")
    refused = run_cli("recipes", "copy", "chestxray14_smoke.yaml")
    assert refused.code == 2 and "exists; pass --force" in refused.err
    assert target.read_text() == "# mine\n"  # untouched
    assert run_cli("recipes", "copy", "chestxray14_smoke", "--force").code == 0
    assert target.read_bytes() == SMOKE.read_bytes()
    (tmp_path / "conf").mkdir()
    launch = run_cli("recipes", "copy", "cpu_2proc", "conf")
    assert launch.code == 0 and "accelerate launch --config_file conf/cpu_2proc.yaml" in launch.out
    assert (tmp_path / "conf" / "cpu_2proc.yaml").read_bytes() == (
        REPO / "launch" / "cpu_2proc.yaml").read_bytes()
    assert run_cli("recipes", "copy", "smoke_lr_plan_seed", "sub/s.yaml").code == 0
    assert load_sweep(tmp_path / "sub" / "s.yaml").tasks == load_sweep("smoke_lr_plan_seed").tasks
    unknown = run_cli("recipes", "copy", "chestxray14_smok")
    assert unknown.code == 2 and "did you mean chestxray14_smoke" in unknown.err


def test_show_prints_the_file_as_it_ships(run_cli) -> None:
    assert run_cli("recipes", "show", "chestxray14_smoke").out == SMOKE.read_text()
    launch = run_cli("recipes", "show", "zero2.yaml")
    assert launch.out == (REPO / "launch" / "zero2.yaml").read_text()
    missing = run_cli("recipes", "show", "nope")
    assert missing.code == 2 and "dist-ft recipes list" in missing.err


@pytest.mark.parametrize("name", [f.name for f in shipped_recipes()])
def test_show_resolved_round_trips_to_an_equal_recipe(run_cli, tmp_path: Path,
                                                      name: str) -> None:
    result = run_cli("recipes", "show", name, "--resolved")
    assert result.code == 0, result.err
    written = tmp_path / "resolved.yaml"
    written.write_text(result.out)
    assert load_recipe(written) == load_recipe(name)
    data = yaml.safe_load(result.out)
    assert "max_steps" in data["trainer"]  # every default is spelled out
    assert data["output_dir"].startswith("/")


def test_show_resolved_applies_overrides_and_refuses_non_recipes(run_cli,
                                                                 tmp_path: Path) -> None:
    result = run_cli("recipes", "show", "chestxray14_smoke", "trainer.epochs=2", "optim.lr=0.5")
    assert result.code == 0, result.err
    assert "with trainer.epochs=2 optim.lr=0.5" in result.out.splitlines()[1]
    (tmp_path / "r.yaml").write_text(result.out)
    assert load_recipe(tmp_path / "r.yaml") == load_recipe(
        "chestxray14_smoke", ["trainer.epochs=2", "optim.lr=0.5"])
    bad = run_cli("recipes", "show", "chestxray14_smoke", "--resolved", "optim.lrr=1")
    assert bad.code == 2 and "did you mean 'lr'" in bad.err
    sweep = run_cli("recipes", "show", "smoke_lr_plan_seed", "--resolved")
    assert sweep.code == 2 and "is a shipped sweep, not a recipe" in sweep.err


def test_every_recipes_option_has_help() -> None:
    parser = build_parser()
    recipes = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   ).choices["recipes"]
    actions = next(a for a in recipes._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in actions.choices.items():
        for action in sub._actions:
            assert action.help, f"recipes {name} {action.dest}: no help"
    assert set(actions.choices) == {"list", "copy", "show", "keys"}


def test_commands_take_shipped_names(run_cli, tmp_path: Path) -> None:
    plan = run_cli("plan", "chestxray14_smoke", "--json")
    assert plan.code == 0, plan.err
    assert json.loads(plan.out)["model"] == "resnet18"
    typo = run_cli("plan", "chestxray14_smok")
    assert typo.code == 2 and "did you mean chestxray14_smoke" in typo.err
    # eval/export/predict --config go through recipe_of
    weights = ResolvedWeights(tmp_path / "model.safetensors", None, "file")
    assert recipe_of(weights, Path("chestxray14_smoke")) == SMOKE
    with pytest.raises(ConfigError, match="no shipped recipe has this name"):
        recipe_of(weights, Path("chestxray14"))


def test_submit_resolves_names_to_files_for_the_jobs(run_cli) -> None:
    result = run_cli("submit", "chestxray14_smoke", "--sweep", "smoke_lr_plan_seed",
                     "--nodes", "1", "--dry-run")
    assert result.code == 0, result.err
    # The job runs `dist-ft train FILE --sweep FILE` on another node: files, not names.
    assert f"train {SMOKE} " in result.out
    assert f"--sweep {CONFIGS / 'sweeps' / 'smoke_lr_plan_seed.yaml'} " in result.out


def test_recipes_list_does_not_import_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dist_ft", "recipes",
                             "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "dist_ft.cli.recipes" in imported
    assert "torch" not in imported


def test_keys_prints_the_reference_under_a_prefix(run_cli) -> None:
    result = run_cli("recipes", "keys", "optim")
    assert result.code == 0, result.err
    lr = next(line for line in result.out.splitlines() if line.split()[:1] == ["optim.lr"])
    assert lr.split()[-1] == "0.001"
    assert all(line.startswith(("KEY", "optim", " ")) for line in result.out.splitlines())
    everything = run_cli("recipes", "keys")
    assert "trainer.max_steps" in everything.out and "output_dir" in everything.out
    wrong = run_cli("recipes", "keys", "optm")
    assert wrong.code == 2 and "did you mean optim" in wrong.err and not wrong.out
