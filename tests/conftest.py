"""Shared fixtures: recipe builders and an in-process CLI runner."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_ft.cli.main import main
from dist_ft.config import Recipe, load_recipe
from dist_ft.console import PROGRESS_ENV, VERBOSITY_ENV

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@dataclass
class CliResult:
    """Exit code and captured streams of one ``dist-ft`` invocation."""

    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Run ``dist-ft ARGS`` in-process and capture its output."""
    # main() records -v/-q in the environment (for the processes it starts): undo it after
    # the test, or a -q here would silence every later test of the session.
    monkeypatch.setenv(VERBOSITY_ENV, "0")

    def _run(*args: str) -> CliResult:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return _run


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    """Write a recipe mapping to a YAML file under ``tmp_path``."""
    counter = iter(range(10_000))

    def _write(data: dict[str, Any]) -> Path:
        path = tmp_path / f"recipe_{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


@pytest.fixture
def recipe_factory(
    write_recipe: Callable[[dict[str, Any]], Path],
) -> Callable[..., Recipe]:
    """Build a validated recipe from a base mapping plus dotted overrides.

    >>> recipe_factory({"model": {"name": "resnet18"}}, "optim.lr=0.1")
    """

    def _make(data: dict[str, Any], *overrides: str) -> Recipe:
        return load_recipe(write_recipe(copy.deepcopy(data)), overrides)

    return _make


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


def plain_env() -> dict[str, str]:
    """This environment without any launcher variables: a plain one-process run."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_CXR14 = FIXTURES / "chestxray14"


@pytest.fixture(scope="session")
def tiny_cxr14_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image synthetic ChestX-ray14 release at 64 px (shared, treat as read-only)."""
    from dist_ft.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("tiny_cxr14")
    write_synthetic(root, images=40, size=64, seed=3, per_folder=25)
    return root


@pytest.fixture
def tiny_cxr14(tiny_cxr14_session: Path, tmp_path: Path) -> Path:
    """A private copy of the 40-image synthetic release, safe to damage."""
    import shutil

    root = tmp_path / "cxr14"
    shutil.copytree(tiny_cxr14_session, root)
    return root


def lists_by_patient(rows: list) -> dict[str, list[str]]:
    """Twin rows (``write_synthetic``'s) in train/val/test lists by patient, every fourth
    patient in no list."""
    patients = sorted({r.patient for r in rows})
    role_of = {p: ("train", "val", "test", None)[i % 4] for i, p in enumerate(patients)}
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for r in rows:
        if role_of[r.patient] is not None:
            lists[role_of[r.patient]].append(r.image)
    return lists


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Default verbosity and progress mode for the test; the loggers' handlers and levels
    (which dist-ft's console set-up changes) put back afterwards."""
    monkeypatch.setenv(VERBOSITY_ENV, "0")  # setenv records the undo (delenv of an unset
    monkeypatch.delenv(PROGRESS_ENV, raising=False)  # variable would not)
    root, ours = logging.getLogger(), logging.getLogger("dist_ft")
    saved = (list(root.handlers), root.level, list(ours.handlers), ours.level, ours.propagate)
    yield
    root.handlers, ours.handlers = saved[0], saved[2]
    root.setLevel(saved[1])
    ours.setLevel(saved[3])
    ours.propagate = saved[4]
