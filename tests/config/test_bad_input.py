"""Hostile or mistaken recipe values: non-finite floats, booleans for numbers, huge images,
non-UTF-8 files, ``~`` and relative paths. Each fails naming its key (or file), or resolves."""

from __future__ import annotations

import random
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_ft.config import ConfigError, load_recipe, recipe_to_dict, schema, validate_recipe
from dist_ft.config.schema import Recipe, Section, slurm_time_seconds
from tests.conftest import CONFIGS

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def problems_of(overrides: list[str], path: Path = SMOKE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return info.value.problems


# Where each section lives in a recipe, and the overrides that make it exist there.
SECTIONS: dict[type[Section], tuple[str, list[str]]] = {
    Recipe: ("", []),
    schema.ModelConfig: ("model", []),
    schema.DataConfig: ("data", []),
    schema.AugmentConfig: ("data.augment", []),
    schema.CsvConfig: ("data.csv", ["data.format=csv", "data.cache=null",
                                    "data.csv={file: l.csv, label_column: y}"]),
    schema.SplitFilesConfig: ("data.split_files", ["data.split_files={test: t.txt}"]),
    schema.ChexpertLabelsConfig: ("data.chexpert", ["data.format=chexpert", "data.cache=null"]),
    schema.PlanConfig: ("plan", []),
    schema.StageConfig: ("plan.stages[0]", []),
    schema.Rule: ("plan.stages[0].include[0]",
                  ["plan.stages=[{name: s, start_step: 0, include: [{last_blocks: 1}]}]"]),
    schema.AdapterConfig: ("plan.stages[0].adapters",
                           ["plan.stages=[{name: s, start_step: 0, adapters: {target: [head]}}]"]),
    schema.OptimConfig: ("optim", []),
    schema.GroupConfig: ("optim.groups[0]", ["optim.groups=[{name: g, match: [head]}]"]),
    schema.ScheduleConfig: ("schedule", []),
    schema.TrainerConfig: ("trainer", []),
    schema.FsdpConfig: ("trainer.fsdp", ["trainer.backend=fsdp"]),
    schema.FsdpMixedPrecision: ("trainer.fsdp.mixed_precision", ["trainer.backend=fsdp"]),
    schema.LoggingConfig: ("logging", []),
    schema.LaunchConfig: ("launch", []),
}


def _kinds(annotation: Any) -> tuple[set[str], bool]:
    """Which of int/float an annotation accepts, and whether it is a tuple of them."""
    origin = typing.get_origin(annotation)
    if annotation is int:
        return {"int"}, False
    if annotation is float:
        return {"float"}, False
    if origin is typing.Literal:
        ints = any(type(a) is int for a in typing.get_args(annotation))
        return ({"int"} if ints else set()), False
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        kinds: set[str] = set()
        tuples = origin is tuple
        for arg in typing.get_args(annotation):
            arg_kinds, arg_tuple = _kinds(arg)
            kinds |= arg_kinds
            tuples |= arg_tuple and origin is not list  # an optional tuple (data.mean) too
        return kinds, tuples
    return set(), False


def numeric_fields() -> list[tuple[str, str, bool, list[str]]]:
    """(key path, int|float, is a tuple, setup overrides) for every number in the schema."""
    out = []
    for cls, (prefix, setup) in SECTIONS.items():
        for name, info in cls.model_fields.items():
            kinds, is_tuple = _kinds(info.annotation)
            for kind in sorted(kinds):
                out.append((f"{prefix}.{name}" if prefix else name, kind, is_tuple, setup))
    return out


def test_the_walk_covers_every_section_and_finds_the_known_numbers() -> None:
    sections = {v for v in vars(schema).values()
                if isinstance(v, type) and issubclass(v, Section) and v is not Section}
    assert sections == set(SECTIONS), "add the new section to SECTIONS"
    keys = {(k, kind) for k, kind, _, _ in numeric_fields()}
    assert {("trainer.epochs", "int"), ("data.batch_size", "int"), ("trainer.zero_stage", "int"),
            ("plan.stages[0].include[0].last_blocks", "int"), ("optim.lr", "float"),
            ("optim.betas", "float"), ("schedule.gamma", "float")} <= keys
    assert len(keys) > 40


@pytest.mark.parametrize(("key", "kind", "is_tuple", "setup"), numeric_fields(),
                         ids=[f"{k}:{kind}" for k, kind, _, _ in numeric_fields()])
def test_a_boolean_is_refused_for_every_number(key: str, kind: str, is_tuple: bool,
                                               setup: list[str]) -> None:
    value = "[true, true]" if is_tuple else "yes"  # YAML 1.1: yes is a boolean
    problems = problems_of([*setup, f"{key}={value}"])
    where = f"{key}[0]" if is_tuple else key
    said = f"{where}: must be a number, not the boolean true"
    assert any(p.startswith(said) for p in problems), problems


@pytest.mark.parametrize(("key", "is_tuple", "setup"),
                         [(k, t, s) for k, kind, t, s in numeric_fields() if kind == "float"],
                         ids=[k for k, kind, _, _ in numeric_fields() if kind == "float"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan"])
def test_every_float_must_be_finite(key: str, is_tuple: bool, setup: list[str],
                                    value: str) -> None:
    problems = problems_of([*setup, f"{key}=[{value}, {value}]" if is_tuple else f"{key}={value}"])
    where = f"{key}[0]" if is_tuple else key
    assert any(p.startswith(f"{where}: must be a finite number") for p in problems), problems


def test_numbers_still_parse_as_before() -> None:
    recipe = load_recipe(SMOKE, ["optim.lr=1", "optim.weight_decay=0", "schedule.gamma=1",
                                 "trainer.epochs=3", "data.augment.crop_scale=[1, 1]"])
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.trainer.epochs == 3 and type(recipe.trainer.epochs) is int
    assert recipe.data.augment.crop_scale == (1.0, 1.0)
    assert load_recipe(SMOKE, ["data.augment.hflip=yes"]).data.augment.hflip is True


@pytest.mark.parametrize("key", ["data.image_size", "data.load_size"])
def test_image_size_has_an_upper_limit(key: str) -> None:
    assert load_recipe(SMOKE, [f"{key}=8192"])
    problems = problems_of([f"{key}=8193"])
    assert problems == [f"{key}: must be less than or equal to 8192 (got 8193)"]


def test_non_utf8_recipe_is_named_with_the_byte_and_line(run_cli, tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {name: resnet18}\noutput_dir: runs/café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_recipe(latin1)
    assert info.value.source == str(latin1)
    assert info.value.problems[0].startswith("not UTF-8 text: byte 0xe9 at line 2, column 21")
    assert "save it as UTF-8" in info.value.problems[0]
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(b"\xff" + random.Random(0).randbytes(500))
    for command in ("plan", "train"):
        for path in (latin1, noise):
            result = run_cli(command, str(path))
            assert result.code == 2, result.err
            assert f"dist-ft {command}: {path}: invalid recipe" in result.err
            assert "not UTF-8 text" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "runs").exists()


def test_non_utf8_sweep_is_named(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_bytes("grid:\n  trainer.seed: [0, 1]\n# café\n".encode("latin-1"))
    out = tmp_path / "sw"
    submitted = run_cli("submit", str(SMOKE), "--sweep", str(sweep), "--cluster", "local",
                        f"output_dir={out}")
    trained = run_cli("train", str(SMOKE), "--sweep", str(sweep), "--sweep-index", "0",
                      f"output_dir={out}")
    for result in (submitted, trained):
        assert result.code == 2, result.err
        assert f"{sweep}: invalid recipe" in result.err
        assert "not UTF-8 text: byte 0xe9 at line 3" in result.err
    assert not out.exists()


@pytest.fixture
def home_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


def test_every_path_field_is_made_absolute_at_load(home_and_cwd: tuple[Path, Path]) -> None:
    home, cwd = home_and_cwd
    recipe = load_recipe(SMOKE, ["output_dir=~/runs/x", "data.cache=../cache/",
                                 "model.pretrained=~/w/model.safetensors"])
    assert recipe.output_dir == str(home / "runs" / "x")
    assert recipe.data.root == str(cwd / "data" / "cxr14_synth")  # as written in the recipe
    assert recipe.data.cache == str(cwd.parent / "cache")
    assert recipe.model.pretrained == str(home / "w" / "model.safetensors")
    for keyword in ("none", "imagenet"):
        assert load_recipe(SMOKE, [f"model.pretrained={keyword}"]).model.pretrained == keyword
    assert load_recipe(SMOKE, ["data.root=null"]).data.root is None
    csv = load_recipe(SMOKE, ["data.format=csv", "data.root=null", "data.cache=null",
                              "data.csv={file: ~/labels.csv, label_column: y}"])
    assert csv.data.csv is not None and csv.data.csv.file == str(home / "labels.csv")
    assert not (cwd / "~").exists()


def test_resolved_recipe_is_stable_anywhere(home_and_cwd: tuple[Path, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(SMOKE, ["output_dir=runs/a"])
    data = recipe_to_dict(recipe)
    run = Path(recipe.output_dir)
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(data))  # what the trainer writes
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert validate_recipe(data) == recipe  # a submitted task re-validates on another node
    assert recipe_to_dict(validate_recipe(recipe_to_dict(recipe))) == data
    assert load_recipe(run / "recipe.yaml") == recipe  # what dist-ft eval reads


def test_an_unknown_home_is_named(home_and_cwd: tuple[Path, Path]) -> None:
    problems = problems_of(["output_dir=~no_such_user_dist_ft/x"])
    assert problems == ["output_dir: '~no_such_user_dist_ft/x': cannot expand "
                        "'~no_such_user_dist_ft' (no such user, or HOME is unset); write the "
                        "full path"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("48:00:00", 172800), ("1-2", 93600),
    ("1-02:03", 93780), ("2-03:04:05", 183845), ("00:00:01", 1)])
def test_every_slurm_time_format_parses(text: str, seconds: int) -> None:
    assert slurm_time_seconds(text) == seconds
    assert load_recipe(SMOKE, [f"launch.time='{text}'"]).launch.time == text


@pytest.mark.parametrize(("text", "why"), [
    ("99:99:99", "minutes 99 is past 59"), ("1:60", "seconds 60 is past 59"),
    ("1-24", "hours 24 is past 23"), ("0", "no time at all"), ("00:00:00", "no time at all"),
    ("1:2:3:4", "must be a Slurm time limit"), ("25h", "must be a Slurm time limit"),
    (" 01:00:00", "must be a Slurm time limit"), ("-1", "must be a Slurm time limit")])
def test_malformed_slurm_times_are_refused(text: str, why: str) -> None:
    problems = problems_of([f"launch.time='{text}'"])
    assert len(problems) == 1 and problems[0].startswith("launch.time: ") and why in problems[0]


def test_an_unquoted_time_that_yaml_read_as_a_number_says_to_quote_it() -> None:
    problems = problems_of(["launch.time=12:00:00"])  # YAML 1.1: 43200
    assert problems == ["launch.time: got the number 43200: quote the time limit, e.g. "
                        "'12:00:00' (YAML reads unquoted 12:00:00 as 43200 and 30 as a number)"]
