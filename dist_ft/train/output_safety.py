"""Output safety: no command output replaces, or lands inside, one of the command's inputs.

This module owns the rule every writing command (``eval``, ``export``, ``predict``) checks
before any work: :func:`check_outputs` refuses an output that is an input file (also through a
hard link), lies inside an input folder (``data.root``, ``data.cache``), is a folder, or cannot
be written, naming the output, the input and the option to change (:class:`OutputPathError`).
:func:`data_inputs` names what a recipe's data section reads, and :func:`atomic_output`
writes a file so that a failure never leaves it half written. It loads no torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from dist_ft.config.schema import DataConfig


class OutputPathError(ValueError):
    """An output would replace or land inside an input, or cannot be written there."""


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # hard links and bind mounts: different paths, one file
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def data_inputs(data: DataConfig) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files and folders a ``data`` section reads, by their recipe key."""
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    if data.root:
        folders["data.root"] = Path(data.root)
    if data.cache:
        folders["data.cache"] = Path(data.cache)
    if data.csv is not None:
        files["data.csv.file"] = Path(data.csv.file)
    return files, folders


def check_outputs(outputs: Sequence[Path], files: dict[str, Path], folders: dict[str, Path],
                  option: str) -> None:
    """Refuse, before any work, outputs that would destroy an input or cannot be written.

    Args:
        outputs: every file the command will write.
        files: input files by role (``weights``, ``recipe``, ``data.csv.file`` ...).
        folders: input folders by role (``data.root``, ``data.cache``): nothing is written
            inside them.
        option: the command-line option that sets the outputs (named in the fix).

    Raises:
        OutputPathError: naming the output, the input and the fix.
    """
    for out in outputs:
        target = out.expanduser().resolve()
        for role, path in files.items():
            if _same_file(target, path.expanduser().resolve()):
                raise OutputPathError(
                    f"output {out} is the input {role} {path}: writing it would destroy what "
                    f"is read; pass another {option}")
        for role, path in folders.items():
            folder = path.expanduser().resolve()
            if target == folder or folder in target.parents:
                raise OutputPathError(
                    f"output {out} is inside the input folder {role} {path}: dist-ft never "
                    f"writes into its inputs; pass another {option}")
        if target.is_dir():
            raise OutputPathError(f"output {out} is a folder; pass a file path as {option}")
        existing = next(p for p in target.parents if p.exists())
        if not existing.is_dir():
            raise OutputPathError(f"cannot write {out}: {existing} is a file, not a folder; "
                                  f"pass another {option}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {out}: {existing} is not writable; "
                                  f"pass another {option}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds.

    A failure leaves ``path`` as it was (absent or the previous version), never half written.
    The temporary name keeps the suffix: exporters and plotters pick formats by it.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
