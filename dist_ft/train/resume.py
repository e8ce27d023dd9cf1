"""What makes an exact resume: the run's contract, saved in each checkpoint and checked.

A checkpoint stores the resolved recipe and the facts derived from it (plan digest, a digest
of the split's image lists, the global batch). Resuming compares them with the run as it is now and
names every difference. Keys that only change how a run is operated (logging, checkpoint
cadence, timeouts, loader workers, ``output_dir``) are not compared. Differences in
:data:`FIXED` keys make the saved state unusable and are always refused; any other difference
is refused unless the user accepts it by name (``--accept-change KEY``, or a whole section
such as ``schedule``), and accepted changes are recorded.

The number of processes is not part of the contract: every backend's checkpoint resumes on
any number (see :mod:`dist_ft.train.checkpoint`). What a resume on another number must keep
is the global batch (``data.global_batch``: per-process batch x processes x accumulation
steps); hold it with ``data.global_batch_size``, or accept the change by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Operational keys: a resume may change them freely.
IGNORED_PREFIXES = ("output_dir", "model.pretrained", "logging.", "launch.", "data.num_workers",
                    "data.verify_cache", "data.on_bad_image", "trainer.checkpoint_every_steps",
                    "trainer.keep_last", "trainer.portable_checkpoints",
                    "trainer.collective_timeout_min", "trainer.nonfinite_loss",
                    "trainer.nonfinite_max_in_row", "trainer.save_stage_weights",
                    "trainer.fsdp.reshard_after_forward", "trainer.fsdp.cpu_offload",
                    "trainer.fsdp.wrap")
# The saved weights, optimizer state or engine cannot be loaded into a run that changed these.
FIXED_PREFIXES = ("model.name", "model.num_classes", "plan.", "optim.name",
                  "trainer.backend", "trainer.zero_stage")
# Derived facts that older checkpoints did not record: compared only where recorded.
RECORDED_LATER = ("data.global_batch",)
# Derived facts that older checkpoints recorded and that no longer constrain a resume
# (ZeRO checkpoints pinned the world size before their name-keyed state).
NO_LONGER_COMPARED = ("world_size",)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".")
               for p in prefixes)


def _without_later_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without keys added later at their defaults (a stage's ``adapters: null``,
    ``model.source: torchvision``, ``trainer.fsdp`` outside FSDP2), so checkpoints written
    before them still match."""
    recipe = {**recipe}
    trainer = recipe.get("trainer")
    if isinstance(trainer, dict) and trainer.get("backend") != "fsdp":
        recipe["trainer"] = {k: v for k, v in trainer.items() if k != "fsdp"}
    model = recipe.get("model")
    if isinstance(model, dict) and model.get("source") == "torchvision":
        recipe["model"] = {k: v for k, v in model.items() if k != "source"}
    plan = recipe.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("stages"), list):
        stages = [{k: v for k, v in s.items() if not (k == "adapters" and v is None)}
                  if isinstance(s, dict) else s for s in plan["stages"]]
        recipe["plan"] = {**plan, "stages": stages}
    return recipe


def run_contract(recipe: dict[str, Any], plan_digest: str, split_digest: str,
                 global_batch: int) -> dict[str, Any]:
    """The flat key -> value map a checkpoint records and a resume compares.

    Args:
        recipe: the resolved recipe (``data.batch_size`` already derived for this world).
        plan_digest: the plan as resolved on this model.
        split_digest: the images and labels of the split.
        global_batch: samples per optimizer step over all processes.
    """
    contract = {k: v for k, v in _flatten(_without_later_defaults(recipe)).items()
                if not _matches(k, IGNORED_PREFIXES)}
    contract.update({"plan.digest": plan_digest, "data.split": split_digest,
                     "data.global_batch": global_batch})
    return contract


def _comparable(saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Both contracts without :data:`NO_LONGER_COMPARED` keys and without the batch keys
    that the global batch already compares: where both record it (``data.global_batch``,
    the fact a resume must keep), ``data.global_batch_size`` is only how it was spelled, and
    ``data.batch_size`` too where either side derived it from the global batch (8 per
    process on 2 processes is the global batch 16 on 1). Without it (older checkpoints), a
    side's derived ``data.batch_size`` is left out."""
    both = all(c.get("data.global_batch") is not None for c in (saved, now))
    derived = any(c.get("data.global_batch_size") is not None for c in (saved, now))
    out = []
    for contract in (saved, now):
        drop = set(NO_LONGER_COMPARED)
        if both:
            drop.add("data.global_batch_size")
        if (both and derived) or (not both and contract.get("data.global_batch_size")
                                  is not None):
            drop.add("data.batch_size")
        out.append({k: v for k, v in contract.items() if k not in drop})
    return tuple(out)


def with_recorded_global_batch(contract: dict[str, Any], world_size: Any) -> dict[str, Any]:
    """An older checkpoint's contract with the global batch it trained with, derived from
    its per-process batch, accumulation and the world size that wrote it (as far as it
    recorded them); newer contracts unchanged."""
    if "data.global_batch" in contract:
        return contract
    batch, accum = contract.get("data.batch_size"), contract.get("trainer.grad_accum_steps", 1)
    if contract.get("data.global_batch_size") is not None:
        return {**contract, "data.global_batch": contract["data.global_batch_size"]}
    if isinstance(batch, int) and isinstance(accum, int) and isinstance(world_size, int):
        return {**contract, "data.global_batch": batch * accum * world_size}
    return contract


@dataclass(frozen=True)
class Change:
    """One difference between a checkpoint's contract and the run's."""

    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {self.saved!r}, now {self.now!r}"


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[Change]:
    """Every key whose value differs (a key missing on one side counts as None, except a
    :data:`RECORDED_LATER` key the checkpoint predates)."""
    saved, now = _comparable(saved, now)
    keys = sorted((set(saved) | set(now)) - {k for k in RECORDED_LATER if k not in saved})
    return [Change(k, saved.get(k), now.get(k)) for k in keys
            if saved.get(k) != now.get(k) and not _matches(k, IGNORED_PREFIXES)]


class ResumeMismatch(ValueError):
    """The run differs from its checkpoint in ways not accepted; the message lists each."""


def check_resume(saved: dict[str, Any], now: dict[str, Any], accepted: Iterable[str],
                 checkpoint: str) -> list[Change]:
    """Compare contracts; return the accepted changes.

    Args:
        saved: the checkpoint's contract (:func:`run_contract`).
        now: this run's contract.
        accepted: keys or section prefixes the user accepts changing (``optim.lr``,
            ``schedule``, ``trainer.epochs``).
        checkpoint: the checkpoint's path, for messages.

    Raises:
        ResumeMismatch: a fixed key differs, or a difference was not accepted.
    """
    accepted = list(accepted)
    changes = differences(saved, now)
    fixed = [c for c in changes if _matches(c.key, FIXED_PREFIXES)]
    refused = [c for c in changes if c not in fixed and not _matches(c.key, accepted)]
    if fixed or refused:
        lines = [f"cannot resume from {checkpoint}: the run differs from the checkpoint"]
        lines += [f"  - {c} (cannot change on resume: the saved state would not fit)"
                  for c in fixed]
        lines += [f"  - {c}" for c in refused]
        fixes = []
        if any(c.key == "data.global_batch" for c in refused):
            fixes.append(f"to keep the global batch on this number of processes, set "
                         f"data.global_batch_size={saved.get('data.global_batch')}")
        if refused:
            keys = " ".join(f"--accept-change {c.key}" for c in refused)
            fixes.append(f"to continue with the new values deliberately, add {keys}")
        fixes.append("to start over, use another output_dir or --overwrite")
        raise ResumeMismatch("\n".join(lines) + "\n" + "; ".join(fixes))
    return changes
