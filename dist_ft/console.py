"""What ``dist-ft`` prints on stderr: log levels, the log format and progress.

One owner for the console, so every command behaves alike:

- **Levels**: ``dist_ft`` logs at INFO, other libraries' loggers at WARNING (their INFO lines,
  such as ``accelerate.checkpointing`` or onnxruntime's quantization chatter, stay out).
  ``-v`` adds ``dist_ft`` DEBUG and other libraries' INFO, ``-vv`` everything; ``-q`` keeps
  warnings and errors only and no progress. The level travels to child processes (launchers,
  Slurm jobs) in ``DIST_FT_VERBOSITY``.
- **Progress** (:func:`progress`): a tqdm bar on a terminal, with log lines written through
  ``tqdm.write`` while it is open, so they never glue onto the bar; elsewhere (a Slurm log, a
  pipe) one line per 10 % or per minute, whichever comes first, with count, rate and ETA,
  through the ``dist_ft.progress`` logger. ``DIST_FT_PROGRESS=bar|lines|off`` overrides the
  choice.

Base layer: no torch, and tqdm is imported only when a bar is made.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

VERBOSITY_ENV = "DIST_FT_VERBOSITY"
PROGRESS_ENV = "DIST_FT_PROGRESS"
PROGRESS_MODES = ("auto", "bar", "lines", "off")
LINE_PERCENT = 10  # a progress line at least every this many percent ...
LINE_SECONDS = 60.0  # ... or this many seconds, whichever comes first

log = logging.getLogger("dist_ft.progress")


# ---------------------------------------------------------------------------- levels
def verbosity() -> int:
    """The console verbosity: -1 (``-q``), 0 (default), 1 (``-v``), 2 (``-vv``).

    Read from ``DIST_FT_VERBOSITY``, which :func:`set_verbosity` sets, so that processes
    started from this one (``accelerate launch`` workers, Slurm jobs) inherit it.
    """
    value = os.environ.get(VERBOSITY_ENV, "0").strip()
    try:
        return max(-1, min(2, int(value or "0")))
    except ValueError:
        raise ValueError(f"{VERBOSITY_ENV}={value!r}: expected an integer from -1 (quiet) to 2 "
                         "(-vv)") from None


def set_verbosity(level: int) -> None:
    """Make ``level`` this process's verbosity and its children's."""
    os.environ[VERBOSITY_ENV] = str(max(-1, min(2, level)))


def dist_ft_level(level: int | None = None) -> int:
    """The console level of ``dist_ft``'s own loggers at ``level`` (default: current)."""
    level = verbosity() if level is None else level
    return logging.WARNING if level < 0 else logging.INFO if level == 0 else logging.DEBUG


def other_level(level: int | None = None) -> int:
    """The level of other libraries' loggers at ``level`` (default: current)."""
    level = verbosity() if level is None else level
    return logging.WARNING if level <= 0 else logging.INFO if level == 1 else logging.DEBUG


class ConsoleFormatter(logging.Formatter):
    """``dist-ft: message`` for dist-ft's records (``dist-ft: warning: ...`` from WARNING up),
    ``LEVEL logger: message`` for other libraries'."""

    def format(self, record: logging.LogRecord) -> str:
        """One record as a console line."""
        text = record.getMessage().rstrip()  # a captured warning ends in a newline
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.name == "dist_ft" or record.name.startswith("dist_ft."):
            if record.levelno >= logging.WARNING:
                return f"dist-ft: {record.levelname.lower()}: {text}"
            return f"dist-ft: {text}"
        return f"{record.levelname} {record.name}: {text}"


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes (a test's capture, a
    redirect), not the stream of the moment it was made."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: int | None = None) -> None:
    """Set the console up at ``level`` (default: current; see :func:`verbosity`).

    One stderr handler on the root logger (replacing the one an earlier call made; other
    handlers stay), other libraries at :func:`other_level`, ``dist_ft`` at
    :func:`dist_ft_level`, and Python warnings through logging (so they, too, pass around an
    open progress bar).
    """
    if level is not None:
        set_verbosity(level)
    level = verbosity()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "dist_ft_console", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.dist_ft_console = True  # type: ignore[attr-defined]
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(WarningsOnce())
    root.addHandler(handler)
    root.setLevel(other_level(level))
    logging.getLogger("dist_ft").setLevel(dist_ft_level(level))
    logging.captureWarnings(True)
    # A library's FutureWarning about another library's API (DeepSpeed calling torch's
    # deprecated all_gather_into_tensor) is nothing a user can act on: -v shows them.
    warnings.filters[:] = [f for f in warnings.filters if not _is_quiet_future(f)]
    if level < 1:
        warnings.filterwarnings("ignore", category=FutureWarning, module=_NOT_DIST_FT)
    else:
        warnings._filters_mutated()  # type: ignore[attr-defined]  # the filter list changed


_NOT_DIST_FT = r"(?!dist_ft)"


def _is_quiet_future(entry: tuple) -> bool:
    module = entry[3]
    return entry[0] == "ignore" and entry[2] is FutureWarning and module is not None \
        and getattr(module, "pattern", module) == _NOT_DIST_FT


class WarningsOnce(logging.Filter):
    """Pass each distinct Python warning (``py.warnings``) once per handler: torch's
    deprecation wrapper defeats the warnings module's once-per-location rule, so a DeepSpeed
    ZeRO-2 run repeated the same FutureWarning on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a warning already passed; True for everything else."""
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def console_errors_only() -> None:
    """Show only errors on this process's console (a rank other than the main one)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "dist_ft_console", False):
            handler.setLevel(logging.ERROR)


# ---------------------------------------------------------------------------- progress
def progress_mode() -> str:
    """How progress shows: ``bar`` (a terminal), ``lines`` (a log file, a pipe) or ``off``
    (``-q``); ``DIST_FT_PROGRESS`` overrides ``bar``/``lines``."""
    if verbosity() < 0:
        return "off"
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"{PROGRESS_ENV}={mode!r}: expected one of {', '.join(PROGRESS_MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def progress(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it",
             total: float | None = None, enabled: bool = True, **tqdm_kwargs: Any) -> Any:
    """A progress bar over ``iterable`` (or updated by hand), shown as :func:`progress_mode`
    says.

    Args:
        iterable: what to wrap (its length is the total unless ``total`` is given).
        desc: what is going on (``prepare``, ``eval test`` ...): the bar's and lines' label.
        unit: what is counted (``img``, ``step``, ``batch`` ...).
        total: the expected count.
        enabled: False on processes other than the main one: nothing shows.
        **tqdm_kwargs: passed to tqdm (``initial``, ``smoothing``, ``dynamic_ncols`` ...).

    Returns:
        A tqdm instance (``update``, ``set_postfix``, ``close``, iteration, ``with``). On a
        terminal, log lines go through ``tqdm.write`` while it is open; in ``lines`` mode,
        one ``dist_ft.progress`` INFO line per :data:`LINE_PERCENT` % or
        :data:`LINE_SECONDS` s, and a last one when it closes.
    """
    mode = progress_mode() if enabled else "off"
    bar_cls, lines_cls = _classes()
    if mode == "lines":
        return lines_cls(iterable, desc=desc, unit=unit, total=total, **tqdm_kwargs)
    return bar_cls(iterable, desc=desc, unit=unit, total=total, disable=mode == "off",
                   file=sys.stderr, **tqdm_kwargs)


def _duration(seconds: float) -> str:
    """``42s``, ``9m05s``, ``2h03m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def progress_line(desc: str, n: float, total: float | None, unit: str, elapsed: float,
                  done: float, final: bool = False, postfix: str = "") -> str:
    """One progress line: ``prepare: 11212/112120 (10%) 185 img/s, ETA 9m05s``.

    Args:
        desc, unit: the label and what is counted.
        n, total: the count so far and the expected one (None: unknown).
        elapsed: seconds since the start.
        done: the count made in ``elapsed`` (``n`` less a resumed start), for the rate.
        final: the last line: the time taken instead of an ETA.
        postfix: appended after a comma (a bar's ``loss=...``).
    """
    count = f"{n:g}/{total:g} ({math.floor(100 * n / total)}%)" if total else f"{n:g}"
    rate = done / elapsed if elapsed > 0 and done > 0 else None
    parts = [f"{desc}: {count}" + (f" {_rate(rate)} {unit}/s" if rate else "")]
    if final or (total and n >= total):
        parts.append(f"in {_duration(elapsed)}")
    elif rate and total:
        parts.append(f"ETA {_duration((total - n) / rate)}")
    if postfix:
        parts.append(postfix)
    return ", ".join(parts)


class _NullFile:
    """Where a ``lines`` bar's own drawing goes: nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _console_loggers() -> list[logging.Logger]:
    """The loggers with a handler on stdout/stderr: the ones to redirect around a bar."""
    from tqdm.contrib.logging import _is_console_logging_handler

    found = []
    for logger in (logging.getLogger(), logging.getLogger("dist_ft")):
        if any(_is_console_logging_handler(h) for h in logger.handlers):
            found.append(logger)
    return found


@functools.cache
def _classes() -> tuple[type, type]:
    """The two bar classes (made on first use: tqdm loads only when a bar is needed)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    class Bar(tqdm):  # type: ignore[misc]
        """tqdm that writes log lines through ``tqdm.write`` while it is open."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._redirect: Any = None
            super().__init__(*args, **kwargs)
            loggers = [] if self.disable else _console_loggers()
            if loggers:
                self._redirect = logging_redirect_tqdm(loggers, tqdm_class=tqdm)
                self._redirect.__enter__()

        def close(self) -> None:
            try:
                super().close()
            finally:
                redirect, self._redirect = getattr(self, "_redirect", None), None
                if redirect is not None:
                    redirect.__exit__(None, None, None)

    class Lines(tqdm):  # type: ignore[misc]
        """tqdm that draws nothing and logs a line per ``LINE_PERCENT`` % or
        ``LINE_SECONDS`` s (tqdm's documented way: override ``display``)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._label = kwargs.get("desc") or ""
            self._line_t: float | None = None
            self._line_n = 0.0
            self._next_n = 0.0
            kwargs.update(file=_NullFile(), mininterval=0, miniters=1, dynamic_ncols=False)
            super().__init__(*args, **kwargs)
            if not self.disable:  # tqdm's first display() comes before its clock starts
                self._line_t, self._line_n = self.start_t, self.n
                self._plan_next()

        def _plan_next(self) -> None:
            total = self.total
            step = total * LINE_PERCENT / 100 if total else 0
            self._next_n = (math.floor(self.n / step) + 1) * step if step else math.inf

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if self._line_t is None:  # the first call, from __init__
                return True
            now = self._time()
            closing = self.disable  # close() sets it before its last display()
            due = self.n >= self._next_n or now - self._line_t >= LINE_SECONDS
            if self.n != self._line_n and (closing or due):
                log.info("%s", progress_line(
                    self._label, self.n, self.total, self.unit, now - self.start_t,
                    self.n - self.initial, final=closing, postfix=self.postfix or ""))
                self._line_t, self._line_n = now, self.n
                self._plan_next()
            return True

    return Bar, Lines
