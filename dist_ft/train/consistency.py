"""Cross-rank checks: the same plan everywhere, identical replicas where they must be."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_ft.plan import ResolvedPlan, diff_records


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group).

    Uses torch.distributed directly: Accelerate's ``gather_object`` returns its input
    unchanged for some distributed types (a CPU run started without its launcher), which
    would make every cross-rank check pass vacuously.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_CPU_GROUP: dict[str, Any] = {}


def cpu_group() -> Any:
    """A gloo group for small CPU-tensor collectives (None: the default group already is one).

    NCCL reductions would sync the GPU stream each time; a gloo side group on CPU tensors
    does not. Every rank must make its first call at the same point (group creation is
    collective); the trainer does so in set-up.
    """
    dist = torch.distributed
    if "group" not in _CPU_GROUP:
        _CPU_GROUP["group"] = (None if dist.get_backend() == "gloo"
                               else dist.new_group(backend="gloo"))
    return _CPU_GROUP["group"]


class RankMismatchError(RuntimeError):
    """Ranks disagree on the plan or on replicated weights; the message names ranks and params."""


def check_plan_consistency(accelerator: Any, plan: ResolvedPlan, when: str) -> None:
    """All-gather the plan digest; on mismatch every rank raises, naming what differs.

    Raises:
        RankMismatchError: some rank resolved another plan (different recipe, override,
            code or model version).
    """
    digests = gather_objects(plan.digest)
    if len(set(digests)) == 1:
        return
    records = gather_objects(plan.records())
    lines = [f"plan digests differ across ranks {when}:"]
    for rank, digest in enumerate(digests):
        if digest != digests[0]:
            diffs = diff_records(records[0], records[rank], limit=3)
            lines.append(f"  rank {rank} vs rank 0: " + "; ".join(diffs))
    raise RankMismatchError("\n".join(lines))


def replica_checksum(module: nn.Module) -> list[float]:
    """A cheap fingerprint of the trainable weights: sum and sum of squares in float64."""
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    for param in module.parameters():
        if param.requires_grad and param.numel():
            data = param.detach().double()
            total += data.sum().cpu()
            squares += (data * data).sum().cpu()
    return [float(total), float(squares)]


def check_replicas(accelerator: Any, module: nn.Module, when: str) -> None:
    """Compare :func:`replica_checksum` across ranks (skip under ZeRO-3, where shards differ).

    Raises:
        RankMismatchError: the trainable weights differ between ranks.
    """
    sums = gather_objects(replica_checksum(module))
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise RankMismatchError(
            f"trainable weights differ between ranks {when}: rank(s) {bad} vs rank 0 "
            f"(checksums {sums[0]} vs {[sums[r] for r in bad]})"
        )
