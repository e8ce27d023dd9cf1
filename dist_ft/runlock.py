"""The exclusive lock a running trainer holds on its run folder.

``OUTPUT_DIR/.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on
NFSv3+), holds the holder's host, pid, run id and Slurm job id as JSON, and its modification
time is a heartbeat the holder refreshes every :data:`HEARTBEAT_S` seconds. The main process
of a run holds it for every rank. A lock is taken over, with a log line, when its holder is
gone: a dead pid on this host, a heartbeat older than :data:`STALE_AFTER_S` from another host
(a shared file system), or an earlier incarnation of this same Slurm job (a requeue).
Pure Python: no torch import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dist_ft.runlock")

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: the holder's host is gone or cut off


class RunLockedError(RuntimeError):
    """The run folder is in use by another trainer; the message names it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host node1 (run 20261129-..., Slurm job 42)`` for messages."""
    if not holder:
        return "an unknown process (unreadable lock file)"
    text = f"pid {holder.get('pid')} on host {holder.get('host')} (run {holder.get('run_id')}"
    if holder.get("job_id"):
        text += f", Slurm job {holder['job_id']}"
    return text + ")"


class RunLock:
    """Exclusive ownership of one run folder while a trainer runs in it.

    Args:
        path: the lock file (``RunDir.lock``).
        run_id: the id of the run taking the lock.
        job_id: this process's Slurm job id (``SLURM_JOB_ID``), if any.
    """

    def __init__(self, path: str | Path, run_id: str, job_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.job_id = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID")
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.takeover: str | None = None  # why an earlier holder's lock was taken over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ holder
    def _record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "run_id": self.run_id,
                "job_id": self.job_id, "since": time.time()}

    def read_holder(self) -> dict[str, Any] | None:
        """The lock file's content, or None if unreadable."""
        return _read_record(self.path)

    def _is_mine(self, holder: dict[str, Any] | None) -> bool:
        return bool(holder) and holder.get("host") == self.host and holder.get("pid") == self.pid

    def stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why the current holder no longer owns the folder, or None if it still does."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        if holder is None:
            # Being written this instant, or damaged: only an old unreadable file is stale.
            return f"the lock file is unreadable and {age:.0f} s old" if age > 10 else None
        if self._is_mine(holder):
            return "this process held it"
        if holder.get("host") == self.host:  # a live process here always keeps its lock
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid):
                return f"its process (pid {pid}) is gone"
            return None
        if self.job_id and holder.get("job_id") == self.job_id:
            # Slurm never runs two incarnations of a job at once: the holder was this job
            # before it was requeued (perhaps onto another node).
            return f"it was held by an earlier run of this Slurm job {self.job_id} (requeued)"
        if age > STALE_AFTER_S:
            return (f"its heartbeat is {age:.0f} s old (host {holder.get('host')} stopped "
                    f"refreshing it; stale after {STALE_AFTER_S:.0f} s)")
        return None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        """Take the lock, taking over a stale one; start the heartbeat.

        Raises:
            RunLockedError: a live trainer holds it; names the holder.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunLockedError(
                        f"{self.path.parent} is in use by {describe_holder(holder)}: another "
                        "dist-ft train is writing this run folder. Wait for it, stop it, or use "
                        f"another output_dir (if it is gone for good, delete {self.path})"
                    ) from None
                # Move the stale file aside under a unique name, then check that what moved
                # is the lock judged stale: of two processes taking over at once, the
                # second may have moved the first one's fresh lock, and puts it back.
                aside = self.path.with_name(f"{self.path.name}.stale-{self.pid}")
                try:
                    self.path.rename(aside)
                except FileNotFoundError:
                    continue
                if _read_record(aside) != holder:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path)
                    aside.unlink()
                    continue
                aside.unlink()
                self.takeover = f"took over the lock of {describe_holder(holder)}: {reason}"
                log.warning("%s: %s", self.path, self.takeover)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self._record(), fh)
            self._start_heartbeat()
            return
        raise RunLockedError(f"{self.path}: could not take the lock (contended)")

    def rewrite(self) -> None:
        """Record the current ``run_id`` in the held lock file (atomic replace)."""
        tmp = self.path.with_name(f"{self.path.name}.{self.pid}.tmp")
        tmp.write_text(json.dumps(self._record()), encoding="utf-8")
        tmp.replace(self.path)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="dist-ft-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self.read_holder()
            if holder is not None and not self._is_mine(holder):
                log.error("%s was taken over by %s while this run holds it: two trainers may "
                          "now write this folder", self.path, describe_holder(holder))
                continue
            try:  # a passing read error (NFS) only skips one beat
                os.utime(self.path)
            except OSError as exc:
                log.warning("cannot refresh %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._is_mine(self.read_holder()):
            self.path.unlink(missing_ok=True)
