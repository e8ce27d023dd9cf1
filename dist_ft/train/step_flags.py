"""What every rank must agree on at each optimizer step, in one asynchronous all-reduce.

Two decisions need every rank's view at each step boundary: whether any rank's loss was not
finite (the update is dropped, or the run stops, on every rank alike) and whether any rank
received a stop signal (every rank checkpoints at the same step). Both travel in one small
integer vector, summed over a CPU (gloo) group: one slot per rank for the non-finite flag, one
per watched signal. The loop starts the reduction right after the step's last forward and
reads it after the backward, so on a CPU cluster the collective overlaps the backward instead
of holding the host twice per step.
"""

from __future__ import annotations

import signal
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from dist_ft.train.consistency import cpu_group

WATCHED = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Agreed:
    """The outcome of one step's reduction, alike on every rank.

    Attributes:
        nonfinite_ranks: ranks whose loss was not finite in this step.
        signals: names of the watched signals any rank had received (``WATCHED`` order).
    """

    nonfinite_ranks: list[int]
    signals: list[str]


class StepFlags:
    """Start (:meth:`start`) and read (:meth:`wait`) one step's cross-rank flags.

    Every rank must call :meth:`start` at the same point of the same step (it is a
    collective); alone (no process group, or one process) nothing is sent.
    """

    def __init__(self) -> None:
        self._flags: torch.Tensor | None = None
        self._work: Any = None

    def start(self, nonfinite: bool, signals: Collection[int]) -> None:
        """Send this rank's flags; the sum arrives while the caller goes on."""
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        flags = torch.zeros(world + len(WATCHED), dtype=torch.int32)
        flags[rank] = int(nonfinite)
        for i, sig in enumerate(WATCHED):
            flags[world + i] = int(sig in signals)
        self._flags, self._work = flags, None
        if world > 1:
            self._work = dist.all_reduce(flags, group=cpu_group(), async_op=True)

    def wait(self) -> Agreed:
        """Every rank's flags summed: which ranks saw a non-finite loss, which signals came.

        Raises:
            RuntimeError: :meth:`start` was not called for this step.
        """
        if self._flags is None:
            raise RuntimeError("StepFlags.wait() without start() in this step")
        if self._work is not None:
            self._work.wait()
        values = self._flags.tolist()
        self._flags, self._work = None, None
        world = len(values) - len(WATCHED)
        return Agreed(
            nonfinite_ranks=[r for r in range(world) if values[r]],
            signals=[s.name for s, v in zip(WATCHED, values[world:], strict=True) if v])
