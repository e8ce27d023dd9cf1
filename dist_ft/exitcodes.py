"""Exit codes of every ``dist-ft`` command and submitted task: defined here alone."""

from __future__ import annotations

OK = 0  # finished
FAILED = 1  # a runtime failure (data, weights, a lost rank, a held lock ...)
USAGE = 2  # bad recipe, arguments or plan: nothing was started
STOPPED = 3  # stopped on SIGUSR2/SIGTERM/SIGINT after writing a complete checkpoint
