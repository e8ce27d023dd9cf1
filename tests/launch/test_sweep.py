"""Sweep expansion: grid x runs, names safe for shells, globs and #SBATCH lines, exact values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_ft.config.errors import ConfigError
from dist_ft.config.load import apply_overrides, parse_yaml
from dist_ft.launch.sweep import expand_sweep, format_value, load_sweep, safe_name, task_folder


def test_grid_times_runs_in_order_with_named_run_directories() -> None:
    sweep = expand_sweep({
        "grid": {"optim.lr": [1e-3, 3e-4], "trainer.seed": [0, 1]},
        "runs": [{"name": "head_only", "plan.stages[1].start_step": 10**6}, {"name": "staged"}],
        "parallelism": 2,
    })
    assert sweep.parallelism == 2
    assert len(sweep.tasks) == 8
    assert [t.index for t in sweep.tasks] == list(range(8))
    assert sweep.tasks[0].name == "00-head_only_lr-0.001_seed-0"
    assert sweep.tasks[0].overrides == ("plan.stages[1].start_step=1000000", "optim.lr=0.001",
                                        "trainer.seed=0")
    assert sweep.tasks[7].name == "07-staged_lr-0.0003_seed-1"
    assert len({t.name for t in sweep.tasks}) == 8


@pytest.mark.parametrize("value", [
    1e-3, 3, True, None, "1e-3", "yes", "12:00:00", "a: b", "x y", "", "$(touch x); `id`", "a\tb",
    [1, 2], {"a": [1, "x"]}, [{"name": "head", "include": ["head"]}],
])
def test_values_survive_the_trip_through_override_text(value: object) -> None:
    data: dict = {}
    assert apply_overrides(data, [f"k={format_value(value)}"]) == []
    assert data["k"] == value
    assert parse_yaml(format_value(value)) == value


def test_structured_values_get_positional_names() -> None:
    sweep = expand_sweep({"grid": {"plan.stages": [[{"name": "a", "include": ["head"]}],
                                                   [{"name": "b", "include": ["all"]}]]}})
    assert [t.name for t in sweep.tasks] == ["00-stages-v0", "01-stages-v1"]


@pytest.mark.parametrize("hostile", ["a b", "x'; touch /tmp/p; '", "$(id)", "`id`", "a\nb",
                                     "../../etc", "a;b|c&d"])
def test_names_keep_only_path_safe_characters(hostile: str) -> None:
    name = safe_name(hostile)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
    assert "/" not in name and not name.startswith((".", "-"))


def test_task_names_are_safe_and_unique_when_values_differ_only_in_punctuation() -> None:
    values = ["a,b", "a b", "a_b", "a=b", "a*b", "a?b", "a[b]", "a{b}", "a'b", 'a"b', "a$b",
              "a;b", "a/b", "-a", ".a", "a\tb"]
    sweep = expand_sweep({"grid": {"data.root": values, "optim.lr": [1e-3, 3e-4]},
                          "runs": [{"name": "x,y z"}, {"optim.weight_decay": "1,2"}]})
    names = [t.name for t in sweep.tasks]
    assert len(set(names)) == len(names) == 2 * len(values) * 2
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name), name
    assert names[0] == "00-x_y_z_root-a_b_lr-0.001"
    assert names[2 * len(values)] == f"{2 * len(values)}-weight_decay-1_2_root-a_b_lr-0.001"


def test_keys_sharing_their_last_part_keep_the_whole_key() -> None:
    sweep = expand_sweep({"grid": {"optim.lr": [0.1], "optim.groups[0].lr": [0.2],
                                   "trainer.seed": [1]}})
    assert sweep.tasks[0].name == "00-optim.lr-0.1_optim.groups_0_.lr-0.2_seed-1"


def test_bad_sweeps_list_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        expand_sweep({"grid": {"optim.lr": [], "trainer.seed": 3}, "runz": [], "parallelism": 0})
    text = str(err.value)
    for expected in ("runz: unknown key", "grid.optim.lr: must be a non-empty list",
                     "grid.trainer.seed: must be a non-empty list", "parallelism: must be"):
        assert expected in text
    with pytest.raises(ConfigError, match="nothing to sweep"):
        expand_sweep({})
    with pytest.raises(ConfigError, match="cannot read sweep"):
        load_sweep(tmp_path / "missing.yaml")


def test_every_shipped_sweep_expands_and_its_tasks_validate(tmp_path: Path) -> None:
    from dist_ft.launch.submit import plan_submission
    from tests.conftest import CONFIGS

    sweeps = sorted((CONFIGS / "sweeps").glob("*.yaml"))
    assert sweeps
    for sweep in sweeps:
        sub = plan_submission(CONFIGS / "chestxray14_smoke.yaml", [f"output_dir={tmp_path}/s"],
                              {}, sweep)
        assert len(sub.tasks) == len(load_sweep(sweep).tasks) > 1


def test_a_sweep_started_under_the_old_comma_names_resumes_in_its_folders(
    tmp_path: Path
) -> None:
    tasks = load_sweep("smoke_lr_plan_seed").tasks
    task = tasks[3]
    # The name dd01a3c gave this task; a sweep started then keeps its folders.
    assert task.legacy_name == "03-staged,lr=0.003,seed=1"
    assert task.name == "03-staged_lr-0.003_seed-1"
    assert task_folder(tmp_path, task) == tmp_path / task.name  # nothing there: the new name
    (tmp_path / task.legacy_name / "checkpoints").mkdir(parents=True)
    assert task_folder(tmp_path, task) == tmp_path / task.legacy_name
    (tmp_path / task.name).mkdir()  # both exist: the new one (never guess between runs)
    assert task_folder(tmp_path, task) == tmp_path / task.name
