"""Claiming a run folder: lock it, then start fresh, resume, or replace, as the user said.

The main process claims the folder for every rank (:func:`claim_run_folder`): it takes the
lock (:class:`dist_ft.runlock.RunLock`) first, so of two trainers started into one folder the
second is told who holds it, and only then looks at what the folder holds:

- a fresh start (no ``--resume``) into a folder that already holds a run refuses, naming
  what is there and the three choices (``--resume auto``, another ``output_dir``,
  ``--overwrite``);
- ``--overwrite`` moves the old run aside to ``OUTPUT_DIR.replaced-<time>`` (never mixes,
  never deletes);
- ``--resume auto`` takes the newest finished checkpoint whose files are intact, falling back
  to the one before with a warning; with none, the run starts at step 0 under the folder's
  run id;
- ``--resume PATH`` takes that checkpoint; a damaged one is an error naming the file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_ft.rundir import RunDir, new_run_id
from dist_ft.runlock import RunLock
from dist_ft.train.checkpoint import (
    CheckpointDamaged,
    check_output_dir,
    resume_candidates,
    verify_checkpoint,
)

log = logging.getLogger("dist_ft.train")


class RunUsageError(ValueError):
    """The command asks for something the run folder does not allow (exit code 2)."""


@dataclass
class Claim:
    """The outcome of claiming a run folder (decided on the main process, shared by all)."""

    run_id: str
    checkpoint: Path | None = None  # where to resume from; None: start at step 0
    notes: list[str] = field(default_factory=list)  # warnings to log (fallbacks, takeovers)
    moved_aside: Path | None = None  # --overwrite: where the old run went


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
    candidates = resume_candidates(run)
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


def claim_run_folder(run: RunDir, resume: str | None, overwrite: bool,
                     bytes_needed: int) -> tuple[Claim, RunLock]:
    """Lock ``run`` and decide how this start uses it (main process only).

    Args:
        run: the run folder.
        resume: None (fresh start), ``"auto"`` or a checkpoint folder.
        overwrite: move an existing run aside and start anew.
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
            moved = None
            if run.holds_run():
                if not overwrite:
                    raise _refuse_fresh_start(run)
                moved = _move_aside(run)
                notes.append(f"--overwrite: moved the earlier run in {run.root} to {moved}")
            claim = Claim(new_run_id(), None, notes, moved)
        else:
            checkpoint = _pick_checkpoint(run, resume, notes)
            inside = checkpoint is not None and checkpoint.parent == run.checkpoints
            if checkpoint is not None and not inside and run.holds_run():
                raise RunUsageError(
                    f"--resume {checkpoint}: that checkpoint belongs to another run folder, "
                    f"and output_dir {run.root} already holds a run; continue into an empty "
                    "output_dir, or use --resume auto to continue the run that is there")
            run_id = (RunDir.checkpoint_run_id(checkpoint) if inside else None) \
                or (run.run_id() if checkpoint is None or inside else None) or new_run_id()
            if checkpoint is None and resume == "auto":
                notes.append(f"--resume auto: no complete checkpoint in {run.checkpoints}; "
                             "starting at step 0")
            claim = Claim(run_id, checkpoint, notes)
        lock.run_id = claim.run_id
        lock.rewrite()
    except BaseException:
        lock.release()
        raise
    return claim, lock
