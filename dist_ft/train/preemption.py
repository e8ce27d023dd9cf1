"""Stop requests: SIGUSR2 (submitit's and Slurm's warning before preemption or the time limit),
SIGTERM (Slurm's kill, ``scontrol requeue``, ``scancel``) and SIGINT (Ctrl-C) end a run cleanly.

The handler only records the signal: no I/O, no collectives inside it. At every optimizer-step
boundary the loop sends :meth:`StopSignals.pending` in the step's one small all-reduce
(:mod:`dist_ft.train.step_flags`), so every rank learns at the same step that some rank was
signalled; then every rank
takes part in one checkpoint and the run stops (and, after SIGUSR2, requeues itself through
:func:`requeue_job`). A second SIGINT aborts at once (``KeyboardInterrupt``): the run is then
marked failed, and no checkpoint it was writing looks complete.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Any

from dist_ft.cluster import requeue_command
from dist_ft.train.consistency import gather_objects
from dist_ft.train.step_flags import WATCHED, StepFlags

log = logging.getLogger("dist_ft.train")
# Inside a Slurm job, a SIGTERM may be the first half of a preemption notice: submitit sends
# SIGTERM, then SIGUSR2 (two scancel calls). Acting on the SIGTERM alone at the next step
# would stop without the requeue the SIGUSR2 asks for, so a lone SIGTERM waits this long
# for its partner (Slurm's KillWait, 30 s by default, leaves room for it).
TERM_GRACE_S = 2.0


class Preempted(Exception):
    """The run stopped on a signal after writing a complete checkpoint.

    Attributes:
        step: the optimizer step the checkpoint holds.
        checkpoint: its folder.
        signals: names of the signals received (any rank).
        requeued: whether this job asked Slurm to run it again.
        note: what happened about requeueing, in words.
    """

    def __init__(self, step: int, checkpoint: Any, signals: list[str], requeued: bool,
                 note: str) -> None:
        self.step, self.checkpoint, self.signals = step, checkpoint, signals
        self.requeued, self.note = requeued, note
        super().__init__(f"stopped on {'+'.join(signals)} at step {step}; checkpoint "
                         f"{checkpoint}; {note}")


class StopSignals:
    """Records SIGUSR2/SIGTERM/SIGINT on this rank; :meth:`pending` says which to act on."""

    def __init__(self) -> None:
        self.received: set[int] = set()
        self.term_at: float | None = None  # time.monotonic() of the first SIGTERM
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere signals stay as they were)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in WATCHED:
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signum in self.received:
            # Ctrl-C twice: the user wants out now. Further ones are ignored so that the
            # abort itself (marking the run failed, releasing the lock) is not cut short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            raise KeyboardInterrupt
        if signum == signal.SIGTERM and self.term_at is None:
            self.term_at = time.monotonic()
        self.received.add(signum)

    def pending(self) -> set[int]:
        """The received signals to act on now (a lone SIGTERM in a Slurm job waits, above)."""
        ready = set(self.received)
        if (signal.SIGTERM in ready and signal.SIGUSR2 not in ready and self.term_at is not None
                and "SLURM_JOB_ID" in os.environ
                and time.monotonic() - self.term_at < TERM_GRACE_S):
            ready.discard(signal.SIGTERM)
        return ready

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> list[str]:
        """Names of the watched signals that any rank has received (a collective call).

        The training loop gets the same answer from its step's :class:`StepFlags`; this is
        the standalone form.
        """
        flags = StepFlags()
        flags.start(nonfinite=False, signals=self.pending())
        return flags.wait().signals


def requeue_job(signals: list[str], max_requeues: int, main: bool) -> tuple[bool, str]:
    """After a stop: ask Slurm to run this job again if SIGUSR2 came (main process runs
    ``scontrol requeue``); every rank learns the outcome (a collective call).

    Returns:
        Whether the job was requeued, and what happened, in words.
    """
    if "SIGUSR2" not in signals:
        who = "the user interrupted it" if signals == ["SIGINT"] else "Slurm or the user is " \
            "ending the job"
        return False, f"not requeued ({'+'.join(signals)}: {who})"
    requeued = False
    argv, note = requeue_command(os.environ, max_requeues)
    if argv is not None and main:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        requeued = done.returncode == 0
        note = note if requeued else f"{' '.join(argv)} failed: {done.stderr.strip()}"
    return bool(gather_objects(requeued)[0]), note
