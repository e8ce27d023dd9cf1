"""Load a recipe: safe YAML, dotted ``key=value`` overrides, validation, readable errors."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import PathValue, Recipe
from dist_ft.config.shipped import resolve_recipe


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``3e-4`` as a float (YAML 1.2 style)."""


def _construct_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the recipe loader (safe, no duplicate keys).

    Raises:
        ConfigError: the text is not valid YAML; the message gives line and column.
    """
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from None


_INDEX = re.compile(r"\[(\d+)\]")


def split_key(key: str) -> list[str | int]:
    """Split ``plan.stages[1].lr_scale`` or ``plan.stages.1.lr_scale`` into path parts."""
    parts: list[str | int] = []
    for raw in _INDEX.sub(r".\1", key).split("."):
        if raw == "":
            raise ValueError(f"empty component in key {key!r}")
        parts.append(int(raw) if raw.isdigit() else raw)
    return parts


def format_loc(loc: Sequence[str | int]) -> str:
    """``('plan', 'stages', 1, 'include')`` -> ``plan.stages[1].include``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Apply ``key=value`` overrides in place; values are parsed as YAML.

    Returns the problems found (malformed overrides, paths through non-containers, list
    indices out of range). Unknown keys are left for schema validation, which names them.
    """
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
            continue
        try:
            path = split_key(key.strip())
            value = parse_yaml(raw, source=f"override {key}") if raw.strip() else None
        except (ValueError, ConfigError) as exc:
            problems.append(f"override {item!r}: {exc}")
            continue
        node: Any = data
        for depth, part in enumerate(path):
            where = format_loc(path[:depth]) or "recipe"
            last = depth == len(path) - 1
            if isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, list):
                problems.append(f"override {item!r}: {where} has {len(node)} items, no [{part}]")
                break
            else:
                problems.append(f"override {item!r}: {where} is {node!r}, not a mapping or list")
                break
    return problems


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic section class that a location inside a recipe points into."""
    current: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/list/Annotated down to a section class where there is one."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (list, tuple, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _describe(error: dict[str, Any]) -> str:
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    where = format_loc(loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        key = str(loc[-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown key; {hint}allowed: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    got = error.get("input")
    structured = isinstance(got, dict | list) or kind.startswith("value_error")
    shown = "" if structured else f" (got {got!r})"
    return f"{where}: {message}{shown}"


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a recipe or sweep file, which must be UTF-8 (YAML's encoding).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 text (names the first bad byte,
            its line and column, and the fix).
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read {what}: {exc.strerror or exc}"], source) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line}, column {column} "
            f"(offset {exc.start}) is not valid UTF-8; a {what} is a YAML text file: save it "
            "as UTF-8 (e.g. iconv -f latin1 -t utf-8), or check that this is the right file"],
            source) from None


def _absolute(text: str) -> str:
    """``~`` expanded, then absolute against the working directory, ``..`` folded, symlinks
    kept (lexical, so applying it twice changes nothing)."""
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise ValueError(f"{text!r}: cannot expand {expanded.split('/', 1)[0]!r} (no such user, "
                         "or HOME is unset); write the full path")
    return os.path.abspath(expanded)


def _resolve_paths(section: BaseModel, loc: tuple[str | int, ...],
                   problems: list[str]) -> BaseModel:
    """``section`` with every :class:`PathValue` field made absolute, recursively."""
    update: dict[str, Any] = {}
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        marker = next((m for m in info.metadata if isinstance(m, PathValue)), None)
        if marker is None:
            marker = next((m for m in _annotated_metadata(info.annotation)
                           if isinstance(m, PathValue)), None)
        if marker is not None and isinstance(value, str) and value not in marker.keywords:
            try:
                absolute = _absolute(value)
            except ValueError as exc:
                problems.append(f"{format_loc((*loc, name))}: {exc}")
                continue
            if absolute != value:
                update[name] = absolute
        elif isinstance(value, BaseModel):
            resolved = _resolve_paths(value, (*loc, name), problems)
            if resolved is not value:
                update[name] = resolved
    return section.model_copy(update=update) if update else section


def _annotated_metadata(annotation: Any) -> list[Any]:
    """Metadata of ``Annotated`` types inside an Optional (``Annotated[str, M] | None``)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return list(typing.get_args(annotation)[1:])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _annotated_metadata(arg)]
    return []


def validate_recipe(data: Any, source: str | None = None) -> Recipe:
    """Validate a plain mapping as a :class:`Recipe`, collecting every problem.

    Path fields (``output_dir``, ``data.root``, ``data.cache``, ``data.csv.file``,
    ``model.pretrained`` unless a keyword) come back absolute: ``~`` expanded, relative paths
    taken from the working directory. An already resolved recipe comes back unchanged.

    Raises:
        ConfigError: one line per problem, each naming the full key path.
    """
    if not isinstance(data, dict):
        raise ConfigError([f"a recipe is a mapping of sections, got {type(data).__name__}"], source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e) for e in exc.errors()], source) from None
    problems: list[str] = []
    resolved = _resolve_paths(recipe, (), problems)
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(resolved, Recipe)
    return resolved


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides and validate the result.

    Args:
        path: the recipe file, or the name of a shipped recipe (``chestxray14_smoke``, with or
            without ``.yaml``; ``dist-ft recipes list``). A path that exists wins over a name.
        overrides: dotted assignments such as ``optim.lr=3e-4`` or
            ``plan.stages[1].lr_scale=0.5``; values are parsed as YAML.

    Raises:
        ConfigError: the file is missing (an unknown name lists the close shipped ones), not
            UTF-8 or not YAML, an override is malformed, or the recipe fails validation; every
            problem is listed with its key path.

    >>> recipe = load_recipe("configs/chestxray14_densenet121.yaml", ["optim.lr=3e-4"])
    >>> recipe = load_recipe("chestxray14_smoke", ["trainer.max_steps=2"])
    """
    path = resolve_recipe(path)
    source = str(path)
    data = parse_yaml(read_text_file(path, "recipe"), source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"a recipe is a mapping of sections, got {type(data).__name__}"], source)
    problems = apply_overrides(data, overrides)
    if problems:
        raise ConfigError(problems, source)
    return validate_recipe(data, source)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (for the run directory and TensorBoard hparams)."""
    return recipe.model_dump(mode="json", exclude_none=False)
