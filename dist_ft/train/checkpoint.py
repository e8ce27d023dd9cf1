"""Atomic checkpoints: written under a ``.partial`` name, renamed when every rank is done.

``OUTPUT_DIR/checkpoints/step_00000120/`` holds Accelerate's state (model, optimizer — sharded
under ZeRO —, RNG states), ``trainer_state.json`` (counters, stage, data position, schedule)
and one ``rank{r}.pt`` per rank (the augmentation generator). A ``COMPLETE`` marker written
last makes it eligible for ``--resume auto``; a crash mid-write leaves only a ``.partial``
folder that is never picked and is replaced on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


def checkpoints_root(output_dir: str | Path) -> Path:
    """``OUTPUT_DIR/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()
             and not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int,
                    trainer_state: dict[str, Any], rank_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write a checkpoint from every rank, atomically; prune to the last ``keep_last``."""
    final = checkpoints_root(output_dir) / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, mode=0o755)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    torch.save(rank_state, partial / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(partial / STATE, trainer_state)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        _write_json(final / COMPLETE, {"step": step})
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The counters of a finished checkpoint.

    Raises:
        FileNotFoundError: ``path`` is not a finished checkpoint.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a finished checkpoint (no {COMPLETE} marker)")
    return json.loads((path / STATE).read_text())


def load_rank_state(path: str | Path, rank: int) -> dict[str, Any]:
    """This rank's extra state (tensors only: ``weights_only=True``)."""
    return torch.load(Path(path) / f"rank{rank}.pt", map_location="cpu", weights_only=True)
