"""The recipes, sweeps and accelerate launch configs that ship with dist-ft, found by name.

Where they are: an installed wheel holds them as package data in
``dist_ft/_shipped/{recipes,sweeps,launch}/`` (pyproject.toml maps the repo's ``configs/``,
``configs/sweeps/`` and ``launch/`` there); a source checkout (``pip install -e .``,
``PYTHONPATH``) uses the repo's own folders, so the files are never copied. Every command that
takes a recipe resolves its argument here: a path that exists wins, else a shipped name
(``chestxray14_smoke`` or ``chestxray14_smoke.yaml``). Torch-free.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from dist_ft.config.errors import ConfigError

Kind = Literal["recipe", "sweep", "launch"]
KINDS: tuple[Kind, ...] = ("recipe", "sweep", "launch")
KIND_TITLES: dict[Kind, str] = {"recipe": "recipe", "sweep": "sweep",
                                "launch": "launch config"}

_PACKAGE = Path(__file__).absolute().parents[1]  # .../dist_ft
_WHEEL_DIRS: dict[Kind, str] = {"recipe": "_shipped/recipes", "sweep": "_shipped/sweeps",
                                "launch": "_shipped/launch"}
_CHECKOUT_DIRS: dict[Kind, str] = {"recipe": "configs", "sweep": "configs/sweeps",
                                   "launch": "launch"}
SUFFIXES = (".yaml", ".yml")
LIST_HINT = "see `dist-ft recipes list`"


@dataclass(frozen=True)
class ShippedFile:
    """One shipped file: its name (the file name without ``.yaml``), kind and location."""

    name: str
    kind: Kind
    path: Path

    @property
    def purpose(self) -> str:
        """The file's first comment line: what it is for, in one line."""
        return purpose_of(self.path)


def purpose_of(path: Path) -> str:
    """The first ``#`` comment line of a YAML file, without the ``#`` ("" if none)."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text.startswith("#") and text.lstrip("#").strip():
                return text.lstrip("#").strip()
            if text and not text.startswith("#"):
                break  # content before any comment: no purpose line
    return ""


def shipped_dir(kind: Kind) -> Path | None:
    """The folder holding the shipped files of ``kind`` (None if this install has none).

    The wheel layout comes first; a source checkout is recognised by its ``pyproject.toml``
    beside the package, so a stray ``configs/`` next to site-packages is never taken.
    """
    wheel = _PACKAGE / _WHEEL_DIRS[kind]
    if wheel.is_dir():
        return wheel
    checkout = _PACKAGE.parent
    folder = checkout / _CHECKOUT_DIRS[kind]
    if folder.is_dir() and (checkout / "pyproject.toml").is_file():
        return folder
    return None


@cache
def _files(kind: Kind) -> tuple[ShippedFile, ...]:
    folder = shipped_dir(kind)
    if folder is None:
        return ()
    paths = sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return tuple(ShippedFile(p.stem, kind, p) for p in paths)


def shipped_files(kinds: tuple[Kind, ...] = KINDS) -> list[ShippedFile]:
    """Every shipped file of ``kinds``, recipes first, each kind sorted by name."""
    return [f for kind in kinds for f in _files(kind)]


def shipped_recipes() -> list[ShippedFile]:
    """The shipped recipes (``configs/*.yaml`` in the repo)."""
    return shipped_files(("recipe",))


def shipped_sweeps() -> list[ShippedFile]:
    """The shipped sweeps (``configs/sweeps/*.yaml`` in the repo)."""
    return shipped_files(("sweep",))


def shipped_launch_configs() -> list[ShippedFile]:
    """The shipped accelerate launch configs (``launch/*.yaml`` in the repo)."""
    return shipped_files(("launch",))


def _as_name(text: str) -> str | None:
    """``text`` as a shipped name (suffix dropped), or None when it is a path (has a folder
    part or another suffix)."""
    if not text or "/" in text or os.sep in text or text.startswith((".", "~")):
        return None
    stem, dot, suffix = text.rpartition(".")
    if dot and f".{suffix}" in SUFFIXES:
        return stem or None
    return None if dot else text


def find_shipped(name: str, kinds: tuple[Kind, ...] = KINDS) -> ShippedFile | None:
    """The shipped file called ``name`` (with or without ``.yaml``) among ``kinds``, or None."""
    wanted = _as_name(name)
    return next((f for f in shipped_files(kinds) if f.name == wanted), None)


def resolve_shipped(arg: str | Path, kinds: tuple[Kind, ...], what: str) -> Path:
    """A file argument as a path: an existing path as given, else a shipped file's name.

    Args:
        arg: a path, or the name of a shipped file of ``kinds``.
        kinds: where a name is looked up.
        what: the argument's noun for messages ("recipe", "sweep").

    Returns:
        The existing path, the shipped file, or ``arg`` unchanged when it is a path that does
        not exist (the caller's read then reports it as usual).

    Raises:
        ConfigError: ``arg`` is a name no shipped file of ``kinds`` has (lists the close names
            and where to see them all), or a missing path whose file name is a shipped one.
    """
    text = os.fspath(arg)
    try:
        given = Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist: not a path, maybe not a name either
        given = Path(text)
    if given.is_file():  # a folder of the same name as a shipped recipe does not shadow it
        return given
    found = find_shipped(text, kinds)
    if found is not None:
        return found.path
    name = _as_name(text)
    if name is None:  # a path: say so when its file name is a shipped one (configs/X.yaml)
        same = find_shipped(given.name, kinds)
        if same is None:
            return given
        raise ConfigError([f"no such file; the {KIND_TITLES[same.kind]} of that name ships with "
                           f"dist-ft: pass its name {same.name!r} instead of a path, or copy it "
                           f"to edit: dist-ft recipes copy {same.name}"], text)
    raise unknown_name(text, kinds, what, "no such file, and ")


def unknown_name(text: str, kinds: tuple[Kind, ...], what: str, lead: str = "") -> ConfigError:
    """The error for a name that no shipped file of ``kinds`` has: it names the kind the name
    belongs to if another one, else the close names, and where to see them all."""
    name = _as_name(text) or text
    other = find_shipped(name, tuple(k for k in KINDS if k not in kinds))
    if other is not None:
        return ConfigError([f"{lead}{name!r} is a shipped {KIND_TITLES[other.kind]}, not a "
                            f"{what}; {LIST_HINT}"], text)
    names = [f.name for f in shipped_files(kinds)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ConfigError([f"{lead}no shipped {what} has this name; {hint}{LIST_HINT}"], text)


def resolve_recipe(arg: str | Path) -> Path:
    """A recipe argument (path, or shipped recipe name) as a path; see :func:`resolve_shipped`.

    >>> resolve_recipe("chestxray14_smoke").name
    'chestxray14_smoke.yaml'
    """
    return resolve_shipped(arg, ("recipe",), "recipe")


def resolve_sweep(arg: str | Path) -> Path:
    """A sweep argument (path, or shipped sweep name) as a path; see :func:`resolve_shipped`."""
    return resolve_shipped(arg, ("sweep",), "sweep")


def resolve_launch_config(arg: str | Path) -> Path:
    """A launch-config argument (path, or shipped name such as ``cpu_2proc``) as a path."""
    return resolve_shipped(arg, ("launch",), "launch config")
