"""The recipe key reference: complete, described, in step with the schema and the docs page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_ft.config import ConfigError
from dist_ft.config.reference import (
    DOC_PATH,
    REGENERATE,
    format_keys,
    key_rows,
    main,
    render_markdown,
)
from dist_ft.config.schema import Recipe

REPO = Path(__file__).resolve().parents[2]
ROWS = {row.key: row for row in key_rows()}


def test_every_key_has_a_description() -> None:
    missing = [key for key, row in ROWS.items() if not row.description.strip()]
    assert not missing, (f"keys without a description: {', '.join(missing)}; add a docstring "
                         f"under the field in dist_ft/config/schema.py, then run: {REGENERATE}")


def test_docs_page_is_current() -> None:
    page = REPO / DOC_PATH
    assert page.is_file(), f"{DOC_PATH} is missing; create it with: {REGENERATE}"
    assert page.read_text(encoding="utf-8") == render_markdown(), (
        f"{DOC_PATH} is stale (the schema changed); regenerate it with: {REGENERATE}")


def _dump_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path in a model_dump, ``[]`` for list items (as the reference writes them)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= _dump_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                paths |= _dump_paths(item, prefix + "[]")
    return paths


def test_keys_match_what_pydantic_accepts() -> None:
    # Every optional section and list of sections filled, so the dump reaches every key.
    full = Recipe.model_validate({
        "model": {"name": "resnet18"},
        "data": {"format": "csv", "csv": {"file": "labels.csv", "label_columns": ["a"]},
                 "split_files": {"test": "test.txt"}},
        "plan": {"stages": [{"name": "s", "start_epoch": 0, "include": ["all"],
                             "exclude": [{"last_blocks": 1}],
                             "adapters": {"target": [{"last_blocks": 1}]}}]},
        "optim": {"groups": [{"name": "g", "match": ["head"]}]},
    })
    dumped = _dump_paths(full.model_dump())
    assert dumped == set(ROWS), (f"only in the reference: {sorted(set(ROWS) - dumped)}; "
                                 f"only in the schema: {sorted(dumped - set(ROWS))}")
    # Keys the README and the help texts point at.
    for key in ("trainer.max_steps", "model.name", "model.pretrained", "model.num_classes",
                "data.root", "output_dir", "trainer.epochs", "optim.lr",
                "plan.stages[].include[].blocks", "logging.trackers"):
        assert key in ROWS, key


def test_types_defaults_and_allowed_values_read_as_a_user_writes_them() -> None:
    expect = {  # key: (type, default)
        "optim.lr": ("float > 0", "0.001"),
        "data.val_fraction": ("float in [0, 1)", "0.1"),
        "optim.name": ("one of: adamw, adam, sgd", "adamw"),
        "model.pretrained": ("PATH | none | imagenet", "none"),
        "trainer.max_steps": ("int >= 1 or null", "null"),
        "model.num_classes": ("int >= 1", "14"),
        "logging.trackers": ("list, each one of: tensorboard, mlflow, wandb", "[tensorboard]"),
        "plan.stages[].include": ("list of rules", "[]"),  # required unless adapters
        "trainer.precision": ("one of: no, fp16, bf16", "'no'"),  # quoted: YAML's false
    }
    for key, (type_text, default) in expect.items():
        assert (ROWS[key].type, ROWS[key].default) == (type_text, default), key
    assert ROWS["optim.name"].allowed == ("adamw", "adam", "sgd")
    assert "densenet121" in ROWS["model.name"].allowed and ROWS["model.name"].required
    assert ROWS["data.augment"].is_section and not ROWS["optim.lr"].is_section


def test_format_keys_lists_a_section_with_defaults() -> None:
    table = format_keys("optim")
    lines = {line.split()[0]: line for line in table.splitlines() if line and line[0] != " "}
    assert "optim.lr" in lines and "0.001" in lines["optim.lr"].split()
    assert "optim.groups[].match[].glob" in lines
    assert not any(k.startswith("trainer.") for k in lines)
    assert "Base learning rate" in table  # the meaning, under its key
    # One key; list indices optional in the prefix.
    assert _keys_of(format_keys("optim.lr")) == ["optim.lr"]
    assert _keys_of(format_keys("trainer.monitor")) == ["trainer.monitor"]
    assert "plan.stages[].include[].blocks" in _keys_of(format_keys("plan.stages[0].include"))
    assert len(_keys_of(format_keys())) == len(ROWS)


def _keys_of(table: str) -> list[str]:
    return [line.split()[0] for line in table.splitlines()[1:] if line and line[0] != " "]


@pytest.mark.parametrize(("prefix", "suggested"), [
    ("optm", "optim"), ("lr", "optim.lr"), ("trainer.max_step", "trainer.max_steps")])
def test_unknown_prefix_names_close_matches(prefix: str, suggested: str) -> None:
    with pytest.raises(ConfigError) as info:
        format_keys(prefix)
    problem = info.value.problems[0]
    assert repr(prefix) in problem and suggested in problem.split("did you mean")[1]


def test_module_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "docs" / "ref.md"
    assert main(["--write", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_markdown()
    assert main([]) == 0
    assert capsys.readouterr().out.endswith(render_markdown())


def test_reference_imports_without_torch() -> None:
    code = ("import sys, dist_ft.config.reference as r; r.format_keys('optim'); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported"
