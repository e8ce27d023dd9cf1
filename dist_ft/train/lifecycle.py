"""Claiming a run folder: lock it, then start fresh, resume, or replace, as the user said.

The main process claims the folder for every rank (:func:`claim_run_folder`): it takes the
lock (:class:`dist_ft.runlock.RunLock`) first, so of two trainers started into one folder the
second is told who holds it, and only then looks at what the folder holds:

- a fresh start (no ``--resume``) into a folder that already holds a run refuses, naming
  what is there and the three choices (``--resume auto``, another ``output_dir``,
  ``--overwrite``);
- ``--overwrite`` moves the old run aside to ``OUTPUT_DIR.replaced-<time>`` (never mixes,
  never deletes);
- ``--resume auto`` takes the newest finished checkpoint of the folder's run whose files are
  intact, falling back to the one before with a warning; with none, an unfinished run of the
  same recipe starts again at step 0 under its run id (anything else is refused);
- ``--resume PATH`` takes that checkpoint; a damaged one is an error naming the file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_ft.rundir import RunDir, new_run_id
from dist_ft.runlock import RunLock
from dist_ft.train.checkpoint import CheckpointDamaged, check_output_dir, verify_checkpoint
from dist_ft.train.resume import differences, run_contract

log = logging.getLogger("dist_ft.train")


class RunUsageError(ValueError):
    """The command asks for something the run folder does not allow (exit code 2)."""


@dataclass
class Claim:
    """The outcome of claiming a run folder (decided on the main process, shared by all)."""

    run_id: str
    checkpoint: Path | None = None  # where to resume from; None: start at step 0
    notes: list[str] = field(default_factory=list)  # warnings to log (fallbacks, takeovers)


def _refuse_fresh_start(run: RunDir) -> RunUsageError:
    found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in run.existing_entries())
    status = run.read_status() or {}
    what = f"run {status['run_id']} ({status.get('state')}, step {status.get('step')})" \
        if status.get("run_id") else "files of an earlier run"
    return RunUsageError(
        f"output_dir {run.root} already holds {what}: {found}. Starting a new run there would "
        "mix the two. Choose one: --resume auto (continue it), another output_dir=..., or "
        "--overwrite (move the old run aside and start anew)")


def _move_aside(run: RunDir) -> Path:
    aside = run.root.with_name(f"{run.root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{suffix}")
    aside.mkdir(parents=True)
    for entry in run.existing_entries():
        entry.rename(aside / entry.name)
    return aside


def _pick_checkpoint(run: RunDir, resume: str, claim_notes: list[str]) -> Path | None:
    if resume != "auto":
        path = Path(resume).expanduser().absolute()
        if not path.is_dir():
            raise RunUsageError(f"--resume {path}: no such checkpoint folder")
        verify_checkpoint(path)  # damaged or unsafe: an error naming the file
        return path
    candidates = run.complete_checkpoints()[::-1]
    # This folder's run: status.json's id, else the newest checkpoint's. Checkpoints of any
    # other run (copied in by hand) are never resumed from.
    owner = run.run_id() or (RunDir.checkpoint_run_id(candidates[0]) if candidates else None)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointDamaged as exc:
            claim_notes.append(f"--resume auto: skipping {candidate.name}: {exc}; trying the "
                               "checkpoint before it")
            continue
        other = RunDir.checkpoint_run_id(candidate)
        if other != owner:
            claim_notes.append(f"--resume auto: skipping {candidate.name}: written by run "
                               f"{other}, not by this folder's run {owner}")
            continue
        return candidate
    return None


def _set_aside_later_checkpoints(run: RunDir, checkpoint: Path, run_id: str,
                                 claim_notes: list[str]) -> None:
    """Resuming from step N leaves this run's checkpoints after N on another timeline: rename
    them out of the ``step_<digits>`` pattern, so that they are neither resumed from nor
    counted by ``keep_last`` against the new ones."""
    step = RunDir.checkpoint_step(checkpoint) or 0
    for later in run.complete_checkpoints():
        if (RunDir.checkpoint_step(later) or 0) > step and \
                RunDir.checkpoint_run_id(later) in (run_id, None):
            aside = later.with_name(f"{later.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            later.rename(aside)
            claim_notes.append(f"resuming from {checkpoint.name}: set {later.name} (a later "
                               f"point of this run, not resumed from) aside as {aside.name}")


def _check_restart(run: RunDir, recipe: dict[str, Any]) -> None:
    """``--resume auto`` with no checkpoint restarts the folder's run at step 0: only when
    that run did not finish and its recipe is this one (else it would be replaced)."""
    status = run.read_status() or {}
    if status.get("state") == "finished":
        raise RunUsageError(
            f"--resume auto: output_dir {run.root} holds run {status.get('run_id')}, finished "
            "without a checkpoint to continue from; use another output_dir, or --overwrite "
            "to start anew there")
    try:
        saved = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if isinstance(saved, dict):
        changes = differences(run_contract(saved, "", "", 0, 0),
                              run_contract(recipe, "", "", 0, 0))
        if changes:
            raise RunUsageError(
                f"--resume auto: output_dir {run.root} holds a run of another recipe and no "
                "checkpoint: " + "; ".join(map(str, changes[:5])) + ". Use another output_dir, "
                "or --overwrite to start anew there")


def claim_run_folder(run: RunDir, resume: str | None, overwrite: bool,
                     recipe: dict[str, Any], bytes_needed: int) -> tuple[Claim, RunLock]:
    """Lock ``run`` and decide how this start uses it (main process only).

    Args:
        run: the run folder.
        resume: None (fresh start), ``"auto"`` or a checkpoint folder.
        overwrite: move an existing run aside and start anew.
        recipe: the resolved recipe (``recipe_to_dict``), to compare with the folder's.
        bytes_needed: room one checkpoint needs (checked before anything is written).

    Returns:
        The claim and the held lock (release it when the run ends).

    Raises:
        OutputDirError: the folder is not writable or too small.
        RunLockedError: another live trainer holds the folder (names it).
        RunUsageError: a fresh start into a folder holding a run, or a bad ``--resume``.
        CheckpointDamaged, UnsafeCheckpointError: ``--resume PATH`` names a bad checkpoint.
    """
    if overwrite and resume is not None:
        raise RunUsageError("--overwrite starts a new run; it cannot go with --resume")
    check_output_dir(run.root, bytes_needed)
    lock = RunLock(run.lock, run_id=run.run_id() or "(starting)")
    lock.acquire()
    try:
        notes = [lock.takeover] if lock.takeover else []
        if resume is None:
            if run.holds_run():
                if not overwrite:
                    raise _refuse_fresh_start(run)
                notes.append(f"--overwrite: moved the earlier run in {run.root} to "
                             f"{_move_aside(run)}")
            claim = Claim(new_run_id(), None, notes)
        else:
            checkpoint = _pick_checkpoint(run, resume, notes)
            inside = checkpoint is not None and run.checkpoints.is_dir() and \
                os.path.samefile(checkpoint.parent, run.checkpoints)
            if checkpoint is not None and not inside and run.holds_run():
                raise RunUsageError(
                    f"--resume {checkpoint}: that checkpoint belongs to another run folder, "
                    f"and output_dir {run.root} already holds a run; continue into an empty "
                    "output_dir, or use --resume auto to continue the run that is there")
            if checkpoint is None and run.holds_run():
                _check_restart(run, recipe)
                notes.append(f"--resume auto: no complete checkpoint in {run.checkpoints}; "
                             "starting this run again at step 0")
            run_id = (RunDir.checkpoint_run_id(checkpoint) if inside else None) \
                or (run.run_id() if checkpoint is None else None) or new_run_id()
            if inside:
                _set_aside_later_checkpoints(run, checkpoint, run_id, notes)
            claim = Claim(run_id, checkpoint, notes)
        lock.run_id = claim.run_id
        lock.rewrite()
    except BaseException:
        lock.release()
        raise
    return claim, lock
