"""Shipped recipes, sweeps and launch configs: found by name in a source checkout (the repo's
own files), packaged as pyproject.toml says, and resolved in one place by every loader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_ft.config import ConfigError, load_recipe
from dist_ft.config import shipped as shipped_mod
from dist_ft.config.shipped import (
    KINDS,
    find_shipped,
    resolve_launch_config,
    resolve_recipe,
    shipped_dir,
    shipped_files,
    shipped_launch_configs,
    shipped_recipes,
    shipped_sweeps,
)
from dist_ft.launch.sweep import load_sweep
from tests.conftest import CONFIGS, REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
SWEEP = CONFIGS / "sweeps" / "smoke_lr_plan_seed.yaml"


def test_a_checkout_ships_its_own_folders_not_copies() -> None:
    assert shipped_dir("recipe") == CONFIGS
    assert shipped_dir("sweep") == CONFIGS / "sweeps"
    assert shipped_dir("launch") == REPO / "launch"
    assert not (REPO / "dist_ft" / "_shipped").exists()  # the wheel's layout, never in the repo
    assert [f.path for f in shipped_recipes()] == sorted(CONFIGS.glob("*.yaml"))
    assert [f.path for f in shipped_sweeps()] == sorted((CONFIGS / "sweeps").glob("*.yaml"))
    assert [f.path for f in shipped_launch_configs()] == sorted((REPO / "launch").glob("*.yaml"))


def test_pyproject_packages_the_tree_and_the_shipped_folders() -> None:
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    code = set(setuptools.find_packages(str(REPO), include=["dist_ft", "dist_ft.*"]))
    mapped = {f"dist_ft.{d}".replace("/", ".") for d in shipped_mod._WHEEL_DIRS.values()}
    # A new subpackage must be listed, or the wheel would silently lack it.
    assert listed == code | mapped, f"add to pyproject.toml packages: {sorted(code - listed)}"
    assert config["package-dir"] == {
        f"dist_ft.{shipped_mod._WHEEL_DIRS[k]}".replace("/", "."): shipped_mod._CHECKOUT_DIRS[k]
        for k in KINDS}
    assert "specs.json.gz" in config["package-data"]["dist_ft.models"]
    assert (REPO / "dist_ft" / "models" / "specs.json.gz").is_file()


def test_every_shipped_file_has_a_one_line_purpose_and_a_unique_name() -> None:
    files = shipped_files()
    assert len(files) >= 15
    names = [f.name for f in files]
    assert len(names) == len(set(names)), "a name may belong to one kind only"
    for item in files:
        assert item.purpose, f"{item.path}: the first line must be a '# purpose' comment"
        assert len(item.purpose) <= 100 and item.purpose.endswith("."), item.path
    assert find_shipped("chestxray14_smoke").purpose.startswith("The README demo")


def test_every_shipped_recipe_loads_by_name_as_by_path() -> None:
    for item in shipped_recipes():
        assert load_recipe(item.name) == load_recipe(item.path)
    assert load_recipe("chestxray14_smoke.yaml", ["optim.lr=0.1"]) == load_recipe(
        SMOKE, ["optim.lr=0.1"])
    assert resolve_launch_config("cpu_2proc") == REPO / "launch" / "cpu_2proc.yaml"


def test_a_path_that_exists_wins_over_a_name(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mine = SMOKE.read_text().replace("name: resnet18", "name: resnet34")
    Path("chestxray14_smoke.yaml").write_text(mine)
    Path("chestxray14_smoke").write_text(mine)
    assert load_recipe("chestxray14_smoke.yaml").model.name == "resnet34"
    assert load_recipe("chestxray14_smoke").model.name == "resnet34"
    Path("chestxray14_smoke").unlink()
    assert load_recipe("chestxray14_smoke").model.name == "resnet18"  # the shipped one


def test_unknown_names_and_missing_paths_say_what_ships(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as typo:
        load_recipe("chestxray14_smok")
    assert "did you mean chestxray14_smoke" in str(typo.value)
    assert "dist-ft recipes list" in str(typo.value)
    with pytest.raises(ConfigError, match="'smoke_lr_plan_seed' is a shipped sweep, not a recipe"):
        load_recipe("smoke_lr_plan_seed")
    # The help's repo paths, run elsewhere: the hint names the shipped recipe.
    with pytest.raises(ConfigError, match="pass its name 'chestxray14_smoke' instead of a path"):
        load_recipe("configs/chestxray14_smoke.yaml")
    with pytest.raises(ConfigError, match="cannot read recipe"):  # any other missing path
        load_recipe("elsewhere/mine.yaml")
    with pytest.raises(ConfigError, match="no shipped launch config has this name"):
        resolve_launch_config("cpu_3proc")
    assert resolve_recipe("nothing/here.yaml") == Path("nothing/here.yaml")


def test_sweeps_load_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_sweep("smoke_lr_plan_seed").tasks == load_sweep(SWEEP).tasks
    assert load_sweep("smoke_lr_plan_seed.yaml").source == str(SWEEP)
    with pytest.raises(ConfigError, match="did you mean smoke_lr_plan_seed"):
        load_sweep("smoke_lr_plan")


def test_a_folder_named_like_a_shipped_recipe_does_not_shadow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chestxray14_smoke").mkdir()  # e.g. a run or data folder of that name
    assert load_recipe("chestxray14_smoke") == load_recipe(CONFIGS / "chestxray14_smoke.yaml")
