"""Atomic checkpoints: written under a ``.partial`` name, renamed when every rank is done.

``OUTPUT_DIR/checkpoints/step_00000120/`` holds Accelerate's state (model, optimizer — sharded
under ZeRO —, RNG states), ``trainer_state.json`` (counters, stage, data position, schedule)
and one ``rank{r}.pt`` per rank (the augmentation generator). A ``COMPLETE`` marker written
last makes it eligible for ``--resume auto``; a crash mid-write leaves only a ``.partial``
folder that is never picked and is replaced on the next save.
"""

from __future__ import annotations

import importlib
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


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects outside the allowlist; it is not loaded."""


def _deepspeed_classes() -> list[Any]:
    # Plain data holders DeepSpeed pickles into ZeRO optimizer files (checked per version).
    found = []
    for module, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


def check_pickles(path: str | Path) -> None:
    """Open every pickle-based file of a checkpoint with ``torch.load(weights_only=True)``.

    Accelerate reads its files with ``weights_only=True``, but DeepSpeed reads its own with
    ``weights_only=False``. A file that passes here holds only tensors, containers, numpy
    arrays and the allowlisted DeepSpeed classes, so that later read runs no foreign code.
    Memory-mapped: tensors are not read, only the pickles are parsed.

    Raises:
        UnsafeCheckpointError: naming the file and the object it refused.
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = [*TORCH_SAFE_GLOBALS, *_deepspeed_classes()]
    for file in sorted(Path(path).rglob("*")):
        if file.suffix not in PICKLE_SUFFIXES or not file.is_file():
            continue
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # the unpickler's refusal, or a corrupt/foreign file
            reason = next((x.strip() for x in str(exc).splitlines() if "GLOBAL" in x),
                          str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
            raise UnsafeCheckpointError(
                f"{file}: refused to load ({reason}); a checkpoint written by dist-ft holds "
                "only tensors and plain data. Not resuming from it") from None


class OutputDirError(RuntimeError):
    """``output_dir`` cannot take the run's files; the message says why."""


def checkpoint_bytes(num_params: int) -> int:
    """A lower bound on one checkpoint's size: fp32 weights and two Adam moments."""
    return 3 * 4 * num_params


def check_output_dir(output_dir: str | Path, bytes_needed: int, create: bool = True) -> None:
    """Fail before training when ``output_dir`` cannot hold one checkpoint.

    Args:
        output_dir: the run folder.
        bytes_needed: room one checkpoint takes (:func:`checkpoint_bytes`).
        create: make the folder and write a probe file (training); otherwise (submission)
            check, creating nothing, the folder or its nearest existing parent.

    Raises:
        OutputDirError: not writable, or less free space than ``bytes_needed``.
    """
    path = Path(output_dir).expanduser().absolute()
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise OutputDirError(f"output_dir {path} is not writable: {exc}") from None
        existing = path
    else:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise OutputDirError(f"output_dir {path} is not writable: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):  # EROFS too, even for root
            raise OutputDirError(f"output_dir {path} is not writable ({existing})")
    free = shutil.disk_usage(existing).free
    if free < bytes_needed:
        raise OutputDirError(
            f"output_dir {path}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{bytes_needed / 2**20:.0f} MiB")


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
