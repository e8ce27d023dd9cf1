"""Atomic checkpoints: written under a ``.partial`` name, renamed when every rank is done.

``OUTPUT_DIR/checkpoints/step_00000120/`` holds Accelerate's state (model, optimizer — sharded
under ZeRO —, RNG states; under FSDP2 the model and optimizer shards are in ``sharded/``,
written by ``torch.distributed.checkpoint``), ``trainer_state.json`` (counters, stage, data
position, schedule, the run id and the run's contract, see :mod:`dist_ft.train.resume`) and
one ``rank{r}.pt`` per rank (the augmentation generator). Under ZeRO, ``portable/`` also holds
the full fp32 weights and the optimizer moments keyed by parameter name (the form a stage
change carries them in), which a resume on another number of processes loads where
DeepSpeed's partitioned files cannot (DDP's files are whole, FSDP2's DCP shards reshard).
A ``COMPLETE`` marker written last
makes it eligible for ``--resume auto``; a crash mid-write leaves only a ``.partial`` folder
that is never picked and is replaced on the next save. Names and layout come from
:class:`dist_ft.rundir.RunDir`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_ft.rundir import COMPLETE, TRAINER_STATE, RunDir, write_json_atomic
from dist_ft.train.fsdp import SHARDED

log = logging.getLogger("dist_ft.train")


PORTABLE = "portable"  # a ZeRO checkpoint's name-keyed state (see PortableState)


@dataclass(frozen=True)
class PortableState:
    """A model and its optimizer state keyed by parameter name, independent of how many
    processes held it: full fp32 weights and buffers, and each trainable parameter's
    per-element optimizer state (``{name: {"exp_avg": ..., "exp_avg_sq": ...}}``, as
    :func:`dist_ft.train.engine.snapshot_moments` reads it), and each optimizer group's step
    count (None where the optimizer keeps none; the groups are the stage's, in order)."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    steps: list[int | None] | None = None


def moments_to_tensors(moments: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Name-keyed moments as flat ``KEY/NAME`` tensors (one safetensors file)."""
    return {f"{k}/{n}": v.contiguous() for n, kv in moments.items() for k, v in kv.items()}


def moments_from_tensors(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`moments_to_tensors`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        kind, _, name = key.partition("/")
        out.setdefault(name, {})[kind] = value
    return out


def save_portable(folder: Path, portable: PortableState) -> None:
    """Write ``portable`` into the new folder ``folder`` (two safetensors files)."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({k: v.contiguous() for k, v in portable.weights.items()},
              str(folder / "model.safetensors"))
    save_file(moments_to_tensors(portable.moments), str(folder / "optimizer.safetensors"),
              metadata={"group_steps": json.dumps(portable.steps)})


def read_portable(path: str | Path) -> PortableState:
    """A checkpoint's :class:`PortableState`.

    Raises:
        CheckpointDamaged: the checkpoint has none (written before it existed, or not by ZeRO).
    """
    from safetensors.torch import load_file

    folder = Path(path) / PORTABLE
    if not (folder / "model.safetensors").is_file():
        raise CheckpointDamaged(folder, "missing: this ZeRO checkpoint holds only DeepSpeed's "
                                "partitioned state, which loads on the number of processes "
                                "that wrote it")
    from safetensors import safe_open

    file = folder / "optimizer.safetensors"
    with safe_open(str(file), "pt") as fh:
        steps = json.loads((fh.metadata() or {}).get("group_steps", "null"))
    return PortableState(load_file(str(folder / "model.safetensors")),
                         moments_from_tensors(load_file(str(file))), steps)


def save_checkpoint(accelerator: Any, run: RunDir, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep_last: int,
                    changed_frozen: dict[str, torch.Tensor] | None = None,
                    sharded: tuple[Any, Any] | None = None,
                    portable: PortableState | None = None) -> Path:
    """Write a checkpoint from every rank, atomically; prune this run's to the last ``keep_last``.

    Only checkpoints carrying the same ``run_id`` as ``trainer_state`` are ever pruned.

    Args:
        changed_frozen: a *lean* checkpoint (adapter stages): the model file then holds only
            the trainable parameters (and buffers), and these frozen weights that differ from
            the initial ones are stored beside it (main process's copy); the rest is rebuilt
            from the recipe's ``model`` section on resume (see :func:`load_checkpoint`).
        sharded: an FSDP2 model and its optimizer: their shards go to ``sharded/`` through
            DCP (Accelerate, which did not prepare them, then writes the RNG states only).
        portable: the name-keyed state (ZeRO), written to ``portable/`` by the main process.
    """
    final, partial = run.checkpoint(step), run.partial(step)
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, mode=0o755)
    accelerator.wait_for_everyone()
    if sharded is not None:
        from dist_ft.train.fsdp import save_sharded

        save_sharded(partial, *sharded, lean=changed_frozen is not None)
        accelerator.save_state(str(partial))
    elif changed_frozen is None:
        accelerator.save_state(str(partial))
    else:
        _save_lean_state(accelerator, partial)
    if changed_frozen and accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in changed_frozen.items()},
                  str(partial / CHANGED_FROZEN))
    if portable is not None and accelerator.is_main_process:
        save_portable(partial / PORTABLE, portable)
    torch.save(rank_state, partial / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(partial / TRAINER_STATE, trainer_state)
        if final.exists():
            remove_checkpoint(final)
        partial.rename(final)
        write_json_atomic(final / COMPLETE, {"step": step})
        run_id = trainer_state.get("run_id")
        mine = [c for c in run.complete_checkpoints() if RunDir.checkpoint_run_id(c) == run_id]
        for old in mine[:-keep_last]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


CHANGED_FROZEN = "changed_frozen.safetensors"  # a lean checkpoint's frozen-but-changed weights


def _lean_kwargs(accelerator: Any, saving: bool) -> dict[str, Any]:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"exclude_frozen_parameters": True} if saving else {"load_module_strict": False}
    return {} if saving else {"strict": False}


def _save_lean_state(accelerator: Any, folder: Path) -> None:
    """``save_state`` without the frozen parameters in the model file (DeepSpeed's
    ``exclude_frozen_parameters``; elsewhere a pre-save hook drops them)."""
    def drop_frozen(models: list[Any], weights: list[dict[str, Any]], _dir: str) -> None:
        for model, state in zip(models, weights, strict=False):
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            for key in [k for k in state if k in frozen]:
                del state[key]

    handle = accelerator.register_save_state_pre_hook(drop_frozen)
    try:
        accelerator.save_state(str(folder), **_lean_kwargs(accelerator, saving=True))
    finally:
        handle.remove()


def load_checkpoint(accelerator: Any, path: Path, trainable: Collection[str] | None = None,
                    sharded: tuple[Any, Any] | None = None) -> None:
    """Load Accelerate's state of a checkpoint into the prepared model and optimizer.

    Args:
        trainable: for a lean checkpoint, the parameters its model file must hold (the
            module already holds the rest: rebuilt from the recipe, with
            :data:`CHANGED_FROZEN` applied); None for a full checkpoint.
        sharded: an FSDP2 model and its optimizer, loaded from ``sharded/`` (resharded
            onto this run's processes, whatever number wrote it).

    Raises:
        CheckpointDamaged: a lean model file lacks a trainable tensor, or an FSDP2 run meets
            a checkpoint of another backend (or the reverse).
    """
    folder = Path(path) / SHARDED
    if sharded is not None and not folder.is_dir():
        raise CheckpointDamaged(folder, "missing: the checkpoint was written by another backend "
                                "than FSDP2; resume with the trainer.backend that wrote it")
    if sharded is None and folder.is_dir():
        raise CheckpointDamaged(folder, "an FSDP2 checkpoint: resume with trainer.backend=fsdp")
    if sharded is not None:
        from dist_ft.train.fsdp import load_sharded

        load_sharded(Path(path), *sharded, lean=trainable is not None)
        accelerator.load_state(str(path))  # RNG states
        return
    if trainable is None:
        accelerator.load_state(str(path))
        return
    file = Path(path) / "model.safetensors"  # Accelerate's model file outside DeepSpeed
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), "pt") as fh:
            held = {k.removeprefix("module.") for k in fh.keys()}  # noqa: SIM118
        missing = sorted(set(trainable) - held)
        if missing:
            raise CheckpointDamaged(file, f"lacks {len(missing)} trainable tensors, e.g. "
                                          f"{', '.join(missing[:3])}")
    accelerator.load_state(str(path), **_lean_kwargs(accelerator, saving=False))


def read_changed_frozen(path: Path) -> dict[str, torch.Tensor]:
    """A lean checkpoint's frozen weights that differ from the initial ones (may be none)."""
    from safetensors.torch import load_file

    file = Path(path) / CHANGED_FROZEN
    return load_file(str(file)) if file.is_file() else {}


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that no interruption leaves it looking complete: it is
    renamed out of the ``step_<digits>`` pattern first, then removed."""
    doomed = path.with_name(path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is empty, truncated or unreadable; the message names the file."""

    def __init__(self, file: Path, why: str) -> None:
        self.file, self.why = file, why
        super().__init__(f"{file}: damaged checkpoint file ({why})")


def _check_safetensors(file: Path) -> None:
    # Header: 8-byte little-endian length, then that much JSON naming each tensor's offsets.
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointDamaged(file, f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointDamaged(file, f"header of {length} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise CheckpointDamaged(file, f"unreadable safetensors header: {exc}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + length + end != size:
        raise CheckpointDamaged(file, f"truncated: {size} bytes, the header needs "
                                      f"{8 + length + end}")


def _check_pickle(file: Path, allowed: list[Any]) -> None:
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        # The weights-only unpickler names what it refused ("Unsupported global: GLOBAL x");
        # anything else (EOF, a bad zip, a foreign format) is damage, not a security matter.
        refused = next((x for x in lines if "GLOBAL" in x), None)
        if refused is not None:
            raise UnsafeCheckpointError(
                f"{file}: refused to load ({refused}); a checkpoint written by dist-ft holds "
                "only tensors and plain data. Not resuming from it") from None
        raise CheckpointDamaged(file, f"unreadable: {(lines or [repr(exc)])[0][:200]}") from None


def _check_dcp_metadata(file: Path) -> None:
    import pickle

    from dist_ft.train.fsdp import read_metadata

    try:
        metadata = read_metadata(file)
        extents = [(str(i.relative_path), i.offset + i.length, index.fqn)
                   for index, i in (metadata.storage_data or {}).items()]
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise UnsafeCheckpointError(f"{file}: refused to load ({exc}); DCP's index names "
                                        "only its own record classes. Not resuming from it"
                                        ) from None
        raise CheckpointDamaged(file, f"unreadable: {exc}") from None
    except ValueError as exc:
        raise UnsafeCheckpointError(f"{file}: {exc}. Not resuming from it") from None
    except Exception as exc:  # EOF, a truncated pickle, something not DCP's
        raise CheckpointDamaged(file, f"unreadable: {str(exc)[:200] or type(exc).__name__}"
                                ) from None
    # Each tensor's extent in its shard file, as the index records it: a missing or truncated
    # shard is found here, not inside DCP's load on every rank.
    sizes: dict[str, int] = {}
    for name, end, fqn in extents:
        shard = file.parent / name
        if Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{file}: a shard path {name!r} outside its folder. "
                                        "Not resuming from it")
        if name not in sizes:
            sizes[name] = shard.stat().st_size if shard.is_file() else -1
        if sizes[name] < 0:
            raise CheckpointDamaged(shard, "missing")
        if end > sizes[name]:
            raise CheckpointDamaged(shard, f"truncated: {sizes[name]} bytes, {fqn} needs {end}")


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of a finished checkpoint before anything loads it.

    ``trainer_state.json`` must parse; no file may be empty; safetensors files must be as
    long as their header says; every pickle-based file is opened with
    ``torch.load(weights_only=True)`` (memory-mapped: the pickles are parsed, tensors are
    not read); DCP's ``.metadata`` index (FSDP2) may name only DCP's record classes and no
    pickled object (its shard files then hold tensors only, which DCP reads weights-only).
    Accelerate reads its files with ``weights_only=True`` but DeepSpeed reads its own with
    ``weights_only=False``: a file that passes here holds only tensors, containers,
    numpy arrays and the allowlisted DeepSpeed classes, so that later read runs no foreign
    code.

    Raises:
        CheckpointDamaged: a file is empty, truncated or unreadable (names it).
        UnsafeCheckpointError: a pickle references code outside the allowlist (names it).
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    path = Path(path)
    state = path / TRAINER_STATE
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(state, "missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(state, f"not valid JSON: {exc}") from None
    world = saved.get("world_size") if isinstance(saved, dict) else None
    for rank in range(world if isinstance(world, int) else 0):
        if not (path / f"rank{rank}.pt").is_file():
            raise CheckpointDamaged(path / f"rank{rank}.pt", "missing")
    if (path / SHARDED).is_dir() and not (path / SHARDED / ".metadata").is_file():
        raise CheckpointDamaged(path / SHARDED / ".metadata", "missing")
    allowed = [*TORCH_SAFE_GLOBALS, *_deepspeed_classes()]
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        # A rank may hold no shard at all (more ranks than rows): its DCP file can be empty;
        # the index's extents are checked against every shard file below.
        if file.stat().st_size == 0 and file.name != COMPLETE and file.suffix != ".distcp":
            raise CheckpointDamaged(file, "0 bytes")
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.name == ".metadata":  # DCP's index of the shards: a plain pickle
            _check_dcp_metadata(file)
        elif file.suffix in PICKLE_SUFFIXES:
            _check_pickle(file, allowed)


class OutputDirError(RuntimeError):
    """``output_dir`` cannot take the run's files; the message says why."""


def checkpoint_bytes(num_params: int, trainer: Any = None) -> int:
    """A lower bound on one checkpoint's size: fp32 weights and two Adam moments, twice under
    ZeRO with ``trainer.portable_checkpoints`` (``trainer``: the recipe's section)."""
    copies = 2 if trainer is not None and trainer.backend == "deepspeed" \
        and trainer.portable_checkpoints else 1
    return copies * 3 * 4 * num_params


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
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))


def load_rank_state(path: str | Path, rank: int) -> dict[str, Any]:
    """This rank's extra state (tensors only: ``weights_only=True``)."""
    return torch.load(Path(path) / f"rank{rank}.pt", map_location="cpu", weights_only=True)
