"""Sweeps: a grid and/or a list of override sets, expanded into named tasks.

```yaml
# sweep.yaml
grid:                      # every combination (cartesian product, keys in file order)
  optim.lr: [1.0e-3, 3.0e-4]
  trainer.seed: [0, 1, 2]
runs:                      # optional: override sets, each crossed with the grid
  - {name: head_only, plan.stages[1].start_step: 1000000}
  - {name: staged}
parallelism: 4             # at most this many array tasks at once (--parallelism wins)
```

Each task gets a run directory ``SWEEP_DIR/NAME`` where NAME comes from its index and
overrides (``03-staged_lr-0.0003_seed-1``), reduced to ``[A-Za-z0-9._-]``: nothing that a
shell, a glob, an ``#SBATCH`` line or a CSV trips on (no ``,`` ``=`` spaces quotes ``*?[]{}``
``$``). The index keeps names unique when values differ only in such characters. Every reader
of the folders (``train --sweep --sweep-index``, ``submit --sweep``, ``jobs``, the sweep's
aggregation) takes NAME from :func:`expand_sweep`. Overrides never pass through a shell: the
submitted job carries them as data.
Pure: no torch, no submitit.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dist_ft.config.errors import ConfigError
from dist_ft.config.load import parse_yaml, read_text_file

SWEEP_KEYS = ("grid", "runs", "parallelism")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
NAME_LIMIT = 96


@dataclass(frozen=True)
class SweepTask:
    """One task of a sweep: its index, run-directory name and ``key=value`` overrides."""

    index: int
    name: str
    overrides: tuple[str, ...]
    legacy_name: str = ""  # the folder name dist-ft gave this task before 0.1 (commas, '=')


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep."""

    tasks: tuple[SweepTask, ...]
    parallelism: int | None
    source: str


def format_value(value: Any) -> str:
    """A value as override text that :func:`parse_yaml` reads back to the same value."""
    def dump(style: str | None) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=10**9)
        return text.strip().removesuffix("...").strip()

    def reads_back(text: str) -> bool:
        try:
            return parse_yaml(text) == value
        except ConfigError:  # e.g. a tab YAML refuses in a plain scalar: quote it
            return False

    if isinstance(value, str) and reads_back(value):
        return value
    text = dump(None)
    return text if reads_back(text) else dump("'")


def safe_name(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (other runs become ``_``), at most 96 chars,
    never starting with ``-`` (an option to most commands) or ``.`` (hidden).

    >>> safe_name("a b'; $(x)")
    'a_b_x'
    """
    return _UNSAFE.sub("_", text).strip("._-")[:NAME_LIMIT] or "run"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each override key's last component (``optim.lr`` -> ``lr``), or the whole key where two
    keys share that component (``optim.lr`` and ``optim.groups[0].lr`` stay apart)."""
    last = {key: key.rsplit(".", 1)[-1] for key in keys}
    counts: dict[str, int] = {}
    for short in last.values():
        counts[short] = counts.get(short, 0) + 1
    return {key: short if counts[short] == 1 else key for key, short in last.items()}


_LEGACY_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def _legacy_name(index: int, run: dict[str, Any], combo: Sequence[tuple[str, Any, int]]) -> str:
    """The task folder name of earlier versions (``03-staged,lr=0.003,seed=1``): only to find
    a sweep started before task folders lost their commas (:func:`task_folder`)."""
    def clean(text: str) -> str:
        return _LEGACY_UNSAFE.sub("_", text).strip("._")[:NAME_LIMIT] or "run"

    def label(key: str, value: Any, position: int) -> str:
        shown = value if isinstance(value, int | float | str | bool) else f"v{position}"
        return f"{key.rsplit('.', 1)[-1]}={shown}"

    fixed = {k: v for k, v in run.items() if k != "name"}
    labels = [clean(str(run["name"]))] if "name" in run else []
    labels += [label(k, v, i) for i, (k, v) in enumerate(fixed.items()) if "name" not in run]
    labels += [label(k, v, i) for k, v, i in combo]
    return clean(f"{index:02d}-" + ",".join(labels))


def task_folder(root: Path, task: SweepTask) -> Path:
    """Where ``task`` of a sweep under ``root`` runs: ``root/task.name``, or the folder an
    earlier version named it (``03-staged,lr=0.003,seed=1``) where only that one holds a run,
    so a sweep started before the rename resumes in place instead of starting over."""
    folder = root / task.name
    legacy = root / task.legacy_name if task.legacy_name else None
    if not folder.exists() and legacy is not None and legacy != folder and legacy.is_dir():
        return legacy
    return folder


def _label(short: str, value: Any, position: int) -> str:
    shown = value if isinstance(value, int | float | str | bool) else f"v{position}"
    return f"{short}-{shown}"


def expand_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    """Expand a parsed sweep mapping into tasks.

    Raises:
        ConfigError: unknown keys, an empty or non-list grid axis, malformed runs; every
            problem listed, each naming its key.
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"a sweep is a mapping with keys {', '.join(SWEEP_KEYS)}"], source)
    for key in data:
        if key not in SWEEP_KEYS:
            problems.append(f"{key}: unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    grid = data.get("grid") or {}
    runs = data.get("runs") or [{}]
    parallelism = data.get("parallelism")
    if not isinstance(grid, dict):
        problems.append("grid: must map override keys to lists of values")
        grid = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: must be a non-empty list of values")
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        problems.append("runs: must be a list of mappings (override key: value, optional name)")
        runs = [{}]
    if parallelism is not None and (type(parallelism) is not int or parallelism < 1):
        problems.append(f"parallelism: must be a positive integer (got {parallelism!r})")
    if not grid and runs == [{}]:
        problems.append("nothing to sweep: give a grid, runs, or both")
    if problems:
        raise ConfigError(problems, source)

    axes = [[(key, value, i) for i, value in enumerate(values)] for key, values in grid.items()]
    short = _short_keys(list(dict.fromkeys(
        [*grid, *(k for r in runs for k in r if k != "name")])))
    tasks = []
    for run, combo in itertools.product(runs, itertools.product(*axes)):
        index = len(tasks)
        fixed = {k: v for k, v in run.items() if k != "name"}
        labels = [safe_name(str(run["name"]))] if "name" in run else []
        labels += [_label(short[k], v, i) for i, (k, v) in enumerate(fixed.items())
                   if "name" not in run]
        labels += [_label(short[k], v, i) for k, v, i in combo]
        overrides = [f"{k}={format_value(v)}" for k, v in fixed.items()]
        overrides += [f"{k}={format_value(v)}" for k, v, _ in combo]
        name = safe_name(f"{index:02d}-" + "_".join(labels))
        tasks.append(SweepTask(index, name, tuple(overrides), _legacy_name(index, run, combo)))
    return Sweep(tuple(tasks), parallelism, source)


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file, given by path or as a shipped sweep's name
    (``smoke_lr_plan_seed``; a path that exists wins).

    Raises:
        ConfigError: unreadable, not UTF-8, not YAML, or malformed (see :func:`expand_sweep`);
            an unknown name lists the close shipped ones.
    """
    from dist_ft.config.shipped import resolve_sweep

    path = resolve_sweep(path)
    source = str(path)
    return expand_sweep(parse_yaml(read_text_file(path, "sweep"), source), source)
