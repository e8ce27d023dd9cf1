"""Find and read the event directories under run folders, sweeps or any tree.

Each directory holding event files becomes one :class:`~dist_ft.logs.aggregate.Member`; its run
is the nearest folder at or above it (within the given root) that holds ``recipe.yaml``, whose
values (``optim.lr``, ``trainer.seed`` ...) are what ``--group-by`` can use. Directories are
read in parallel worker processes when there are several (parsing is CPU-bound).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from dist_ft.console import progress
from dist_ft.logs.aggregate import Member, flatten
from dist_ft.logs.events import RunScalars, find_event_dirs, read_run
from dist_ft.rundir import RunDir

MARKER = ".dist-ft-aggregate"  # in every aggregation output: never read back as a run


def inside_output(event_dir: Path, root: Path) -> bool:
    """Whether ``event_dir`` lies in an aggregation output (a :data:`MARKER` folder) at or
    below ``root``."""
    for folder in (event_dir, *event_dir.parents):
        if (folder / MARKER).is_file():
            return True
        if folder == root:
            return False
    return False


def run_dir_of(event_dir: Path, root: Path) -> Path:
    """The run folder an event directory belongs to (``run/tb/rank1`` -> ``run``)."""
    for folder in (event_dir, *event_dir.parents):
        if RunDir(folder).recipe.is_file():
            return folder
        if folder == root:
            break
    return event_dir


def without_tensorboard(folder: Path) -> list[Path]:
    """The run folders at or below ``folder`` whose recipe leaves ``tensorboard`` out of
    ``logging.trackers``: they have no ``tb/`` to read (their scalars went to MLflow / W&B)."""
    found = []
    for recipe in sorted(folder.rglob("recipe.yaml")):  # folder's own one too
        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        trackers = (data.get("logging") or {}).get("trackers") if isinstance(data, dict) \
            else None
        if isinstance(trackers, list) and "tensorboard" not in trackers:
            found.append(recipe.parent)
    return found


def _read(args: tuple[Path, bool]) -> RunScalars:
    return read_run(*args)


def load_members(roots: list[str | Path], workers: int | None = None,
                 verify_crc: bool = True) -> tuple[list[Member], Path | None]:
    """Every event directory under ``roots``, read, with its run's flattened recipe.

    Returns:
        The members and the roots' common folder (for short group names).

    Raises:
        FileNotFoundError: a root does not exist or holds no event file (names it).
    """
    paths = [Path(r).resolve() for r in roots]
    found: list[tuple[Path, Path]] = []
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        dirs = [d for d in find_event_dirs(root) if not inside_output(d, root)]
        if not dirs:
            off = without_tensorboard(root) if root.is_dir() else []
            why = (f": {len(off)} run(s) here logged without TensorBoard (logging.trackers "
                   f"has no tensorboard, e.g. {off[0]}); aggregate reads tb/, so train with "
                   "tensorboard among logging.trackers, or compare them in MLflow / W&B"
                   ) if off else ""
            raise FileNotFoundError(f"{root}: no TensorBoard event files (events.out.tfevents.*) "
                                    f"below it{why}")
        found += [(d, root) for d in dirs]
    workers = workers if workers is not None else min(len(found), os.cpu_count() or 1)
    jobs = [(d, verify_crc) for d, _ in found]
    shown = {"desc": "read events", "unit": "folder", "total": len(jobs)}
    if workers > 1 and len(found) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, len(jobs) // (4 * workers))
            runs = list(progress(pool.map(_read, jobs, chunksize=chunk), **shown))
    else:
        runs = [_read(j) for j in progress(jobs, **shown)]
    members = []
    recipes: dict[Path, dict] = {}
    for run, (event_dir, root) in zip(runs, found, strict=True):
        run_dir = run_dir_of(event_dir, root)
        if run_dir not in recipes:
            recipe = RunDir(run_dir).recipe
            recipes[run_dir] = flatten(yaml.safe_load(recipe.read_text()) or {}) \
                if recipe.is_file() else {}
        members.append(Member(run=run, run_dir=run_dir, params=recipes[run_dir]))
    common = Path(os.path.commonpath([str(p) for p in paths])) if paths else None
    if common is not None and common.is_file():
        common = common.parent
    return members, common
