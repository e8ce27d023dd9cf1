"""The recipe key reference, generated from the schema (no torch needed).

Every key a recipe accepts, walked from :class:`~dist_ft.config.schema.Recipe`: its dotted
path (``[]`` marks a list item: ``plan.stages[].include[].blocks``), its type as a user reads
it, its default as YAML shows it and its meaning, which is the docstring under the field in
``config/schema.py``. ``dist-ft recipes keys [PREFIX]`` prints :func:`format_keys`;
``docs/config-reference.md`` is :func:`render_markdown`, regenerated with::

    python -m dist_ft.config.reference --write docs/config-reference.md
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dist_ft.config.architectures import ARCHITECTURES
from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import GroupConfig, PathValue, Recipe, Rule, Section, StageConfig

REGENERATE = "python -m dist_ft.config.reference --write docs/config-reference.md"
DOC_PATH = "docs/config-reference.md"

# What one item of a list of these sections is called in a type ("list of rules").
_ITEM_NOUNS: dict[type[BaseModel], str] = {Rule: "rule", StageConfig: "stage",
                                           GroupConfig: "group"}
# Values a validator (not the type) restricts a key to.
# (timm/NAME: any timm model, checked against timm.list_models() when the model is built.)
_VALIDATED_VALUES: dict[str, tuple[str, ...]] = {
    "model.name": (*sorted(ARCHITECTURES), "timm/NAME")}
_SECTION_DEFAULT = "see below"


@dataclass(frozen=True)
class KeyRow:
    """One key of the recipe.

    Attributes:
        key: dotted path; ``[]`` marks a list item (``optim.groups[].match[].glob``).
        type: the type as a user reads it (``int >= 1``, ``one of: adamw, adam, sgd``,
            ``PATH or null``).
        default: the default as YAML shows it (``null``, ``[tensorboard]``), ``required``
            where there is none, ``see below`` for a section whose keys follow.
        allowed: the values the key is restricted to (a Literal, path keywords such as
            ``none``/``imagenet``, the architectures); empty when any value of its type goes.
        description: the field's one-line meaning (its docstring, whitespace collapsed).
        section: the path of the section that holds the key (``""`` for the top level).
        required: the key has no default.
        is_section: the key holds a section (or a list of them) whose keys follow.
    """

    key: str
    type: str
    default: str
    allowed: tuple[str, ...]
    description: str
    section: str
    required: bool
    is_section: bool


def key_rows() -> list[KeyRow]:
    """Every key of a recipe, depth first in schema order (a section's row, then its keys)."""
    rows: list[KeyRow] = []
    _walk(Recipe, "", rows)
    return rows


def _walk(model: type[BaseModel], prefix: str, rows: list[KeyRow]) -> None:
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        text, allowed = _type_text(info.annotation, list(info.metadata))
        allowed = _VALIDATED_VALUES.get(key, allowed)
        if key in _VALIDATED_VALUES:
            text = "architecture name"
        child, suffix = _child_section(info.annotation)
        rows.append(KeyRow(key=key, type=text, default=_default_text(info, child),
                           allowed=allowed, description=" ".join((info.description or "").split()),
                           section=prefix, required=info.is_required(),
                           is_section=child is not None))
        if child is not None:
            _walk(child, key + suffix, rows)


def _strip_annotated(tp: Any, metadata: list[Any]) -> Any:
    """``tp`` without ``Annotated``, its metadata appended to ``metadata`` (a nested
    ``Field(...)`` contributes its own constraints)."""
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        metadata.extend(extra)
    for item in list(metadata):
        if isinstance(item, FieldInfo):
            metadata.extend(item.metadata)
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _union_args(tp: Any) -> tuple[list[Any], bool] | None:
    """The non-None members of a union and whether None is one, or None if ``tp`` is none."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [a for a in args if a is not type(None)], type(None) in args
    return None


def _child_section(tp: Any) -> tuple[type[BaseModel] | None, str]:
    """The section a key holds (``""``) or a list of (``"[]"``), else ``(None, "")``."""
    tp = _strip_annotated(tp, [])
    union = _union_args(tp)
    if union is not None and len(union[0]) == 1:
        tp = _strip_annotated(union[0][0], [])
    if _is_section(tp):
        return tp, ""
    if typing.get_origin(tp) is list:
        item = _strip_annotated(typing.get_args(tp)[0], [])
        if _is_section(item):
            return item, "[]"
    return None, ""


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds_text(base: str, metadata: list[Any]) -> str:
    """``int >= 1``, ``float in [0, 1)``, or ``base`` without bounds."""
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"[{_number(item.ge)}"
        elif isinstance(item, annotated_types.Gt):
            low = f"({_number(item.gt)}"
        elif isinstance(item, annotated_types.Le):
            high = f"{_number(item.le)}]"
        elif isinstance(item, annotated_types.Lt):
            high = f"{_number(item.lt)})"
    if low and high:
        return f"{base} in {low}, {high}"
    if low:
        return f"{base} {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f"{base} {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return base


def _type_text(tp: Any, metadata: list[Any]) -> tuple[str, tuple[str, ...]]:
    """A type as a user reads it, and the values it allows (empty: any of the type)."""
    tp = _strip_annotated(tp, metadata)
    union = _union_args(tp)
    if union is not None:
        members, optional = union
        texts = [_type_text(m, list(metadata) if len(members) == 1 else []) for m in members]
        text = " | ".join(t for t, _ in texts)
        allowed = tuple(v for _, values in texts for v in values)
        if optional:  # as YAML writes it: a Literal gains a value, anything else an "or"
            text += ", null" if text.startswith("one of: ") else " or null"
        return text, allowed
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        values = tuple(str(v) for v in typing.get_args(tp))
        return "one of: " + ", ".join(values), values
    min_len = next((m.min_length for m in metadata if isinstance(m, annotated_types.MinLen)), 0)
    if origin is list:
        item, allowed = _type_text(typing.get_args(tp)[0], [])
        stripped = _strip_annotated(typing.get_args(tp)[0], [])
        if _is_section(stripped):
            text = f"list of {_ITEM_NOUNS.get(stripped, 'section')}s"
        elif allowed:
            text = f"list, each {item}"
        else:
            text = f"list of {item}"
        return (f"{text} (at least {min_len})" if min_len else text), allowed
    if origin is tuple:
        items = [_type_text(a, []) for a in typing.get_args(tp)]
        if len(items) == 2 and items[0] == items[1]:
            return f"pair of {items[0][0]}", items[0][1]
        return "(" + ", ".join(t for t, _ in items) + ")", ()
    if origin is dict:
        key_t, value_t = (_type_text(a, []) for a in typing.get_args(tp))
        return f"mapping of {key_t[0]} to {value_t[0]}", value_t[1]
    if _is_section(tp):
        return _ITEM_NOUNS.get(tp, "section"), ()
    if tp is bool:
        return "bool", ()
    if tp in (int, float):
        return _bounds_text(tp.__name__, metadata), ()
    if tp is str:
        path = next((m for m in metadata if isinstance(m, PathValue)), None)
        if path is not None:
            return " | ".join(("PATH", *path.keywords)), tuple(path.keywords)
        pattern = next((p for m in metadata if (p := getattr(m, "pattern", None))), None)
        if pattern:
            return f"str matching {pattern}", ()
        return ("non-empty str" if min_len else "str"), ()
    return getattr(tp, "__name__", str(tp)), ()


def _plain(value: Any) -> Any:
    """A default as plain data as a user would write it: rules in their short form,
    sections without the keys left at their defaults, tuples as lists."""
    if isinstance(value, Rule):
        kind = next(k for k in type(value).model_fields if getattr(value, k) is not None)
        shown = getattr(value, kind)
        return shown if kind in ("keyword", "glob") else {kind: _plain(shown)}
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {k: _plain(getattr(value, k)) for k, info in fields.items()
                if info.is_required() or getattr(value, k) != info.get_default(
                    call_default_factory=True)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml_inline(value: Any) -> str:
    """``value`` as YAML writes it in flow style on one line (``[0.7, 1.0]``, ``null``)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False,
                          width=10**6)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _default_text(info: FieldInfo, child: type[BaseModel] | None) -> str:
    if info.is_required():
        return "required"
    default = info.get_default(call_default_factory=True)
    if child is not None and isinstance(default, BaseModel):
        return _SECTION_DEFAULT
    return _yaml_inline(default)


# --- the terminal table ------------------------------------------------------------------

_SPAN = re.compile(r"``(.+?)``")
_ITEM_INDEX = re.compile(r"\[\d*\]")


def _bare(key: str) -> str:
    """``key`` without list markers: ``plan.stages[0].include`` -> ``plan.stages.include``."""
    return _ITEM_INDEX.sub("", key).strip(".")


def _close_matches(prefix: str, rows: list[KeyRow]) -> list[str]:
    """Keys a mistyped prefix may mean: the same last name (``lr`` -> ``optim.lr``), then
    difflib's closest keys."""
    keys = [r.key for r in rows]
    last = _bare(prefix).rsplit(".", 1)[-1]
    same_name = [k for k in keys if k.rsplit(".", 1)[-1].removesuffix("[]") == last]
    similar = difflib.get_close_matches(prefix, keys, n=3, cutoff=0.6)
    return list(dict.fromkeys(same_name + similar))[:3]


def select_rows(prefix: str | None = None) -> list[KeyRow]:
    """The rows of every key at or under ``prefix`` (all for None or ``""``); list indices in
    the prefix are optional (``plan.stages.include``, ``plan.stages[0].include``).

    Raises:
        ConfigError: no key is at or under ``prefix``; the message names close matches.
    """
    rows = key_rows()
    wanted = _bare(prefix or "")
    if not wanted:
        return rows
    chosen = [r for r in rows
              if _bare(r.key) == wanted or _bare(r.key).startswith(wanted + ".")]
    if not chosen:
        close = _close_matches(prefix or "", rows)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        sections = ", ".join(r.key for r in rows if not r.section)
        raise ConfigError([f"no recipe key {prefix!r}{hint} (top-level keys: {sections})"])
    return chosen


def format_keys(prefix: str | None = None) -> str:
    """The keys at or under ``prefix`` (``optim``, ``trainer.monitor``; None: all) as a
    terminal table: key, type and default aligned, the meaning indented below each.

    Raises:
        ConfigError: no key is at or under ``prefix``; the message names close matches.
    """
    rows = select_rows(prefix)
    key_w = max(len("KEY"), *(len(r.key) for r in rows))
    type_w = min(40, max(len("TYPE"), *(len(r.type) for r in rows)))
    lines = [f"{'KEY':<{key_w}}  {'TYPE':<{type_w}}  DEFAULT"]
    for row in rows:
        lines.append(f"{row.key:<{key_w}}  {row.type:<{type_w}}  {row.default}".rstrip())
        text = _SPAN.sub(r"\1", row.description)
        if row.allowed and not row.type.startswith(("one of", "list, each")) \
                and "PATH" not in row.type:
            text += " Allowed: " + ", ".join(row.allowed) + "."
        lines.extend(textwrap.wrap(text, width=100, initial_indent="    ",
                                   subsequent_indent="    "))
    return "\n".join(lines) + "\n"


# --- the markdown page --------------------------------------------------------------------

def _md_text(text: str) -> str:
    """Docstring text as markdown: ````x```` becomes a code span; outside spans, characters
    markdown would act on (``*``, ``<``, backticks) are escaped; ``|`` everywhere (tables)."""
    parts = _SPAN.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # inside a code span
            out.append(f"`{part.replace('|', chr(92) + '|')}`")
        else:
            out.append(re.sub(r"([\\`*<>|])", r"\\\1", part))
    return "".join(out)


def _md_code(text: str) -> str:
    return f"`{text.replace('|', chr(92) + '|')}`"


def _md_anchor(section: str) -> str:
    """GitHub's anchor of a ``## `plan.stages[]` `` heading."""
    return re.sub(r"[^a-z0-9 _-]", "", section.lower()).replace(" ", "-")


def _section_doc(model: type[BaseModel]) -> str:
    """A section's docstring as markdown: paragraphs joined into lines, ``- `` items kept as
    a list."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(model.__doc__ or "")):
        lines: list[str] = []
        for line in paragraph.splitlines():
            text = line.strip()
            if text.startswith("- ") or not lines:
                lines.append(text)
            else:
                lines[-1] += " " + text
        out.append("\n".join(("- " + _md_text(x[2:])) if x.startswith("- ") else _md_text(x)
                             for x in lines if x))
    return "\n\n".join(p for p in out if p)


def _section_models() -> dict[str, type[BaseModel]]:
    """Each section path (``""``, ``data.augment``, ``plan.stages[]``) and its model, in order."""
    models: dict[str, type[BaseModel]] = {"": Recipe}
    for row in key_rows():
        if row.is_section:
            parent = models[row.section]
            child, suffix = _child_section(parent.model_fields[row.key.rsplit(".", 1)[-1]]
                                           .annotation)
            assert child is not None
            models[row.key + suffix] = child
    return models


def render_markdown() -> str:
    """The whole key reference as a markdown page: a table per section, in schema order."""
    rows = key_rows()
    models = _section_models()
    out = [
        "# Recipe key reference",
        "",
        f"<!-- Generated from dist_ft/config/schema.py; do not edit. Regenerate: {REGENERATE}"
        " -->",
        "",
        "Every key a recipe accepts, generated from the schema (`dist_ft/config/schema.py`, "
        "where each field's docstring is its meaning). After changing the schema, regenerate "
        "this page:",
        "",
        "```",
        REGENERATE,
        "```",
        "",
        "In a terminal, `dist-ft recipes keys [PREFIX]` prints the same keys "
        "(`dist-ft recipes keys optim`). A key is a dotted path; `[]` marks an item of a list "
        "(`plan.stages[].include[].blocks`), written `plan.stages[1].lr_scale=0.5` in an "
        "override. A key that takes `null` leaves the setting off or to its default; a rule "
        "in YAML is a keyword (`head`, `stem`, `all`), a glob string, or a mapping with one "
        "of its other keys (`last_blocks: 2`).",
        "",
        "Sections: " + ", ".join(f"[`{s or 'top level'}`](#{_md_anchor(s or 'top level')})"
                                 for s in models),
        "",
    ]
    for section, model in models.items():
        title = section or "top level"
        out += [f"## {title}" if section.count(".") + section.count("[]") == 0 else
                f"### {title}", ""]
        doc = _section_doc(model)
        if doc:
            out += [doc, ""]
        out += ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        for row in (r for r in rows if r.section == section):
            name = row.key[len(section):].lstrip(".") if section else row.key
            meaning = _md_text(row.description)
            if row.is_section:
                meaning += f" See [`{row.key}`](#{_md_anchor(_section_key(row, models))})."
            if row.key in _VALIDATED_VALUES:
                meaning += " One of: " + ", ".join(f"`{v}`" for v in row.allowed) + "."
            default = "*required*" if row.required else (
                row.default if row.default == _SECTION_DEFAULT else _md_code(row.default))
            out.append(f"| `{name}` | {_md_code(row.type)} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)


def _section_key(row: KeyRow, models: dict[str, type[BaseModel]]) -> str:
    """The section path a section-holding row leads to (``plan.stages`` -> ``plan.stages[]``)."""
    return row.key + "[]" if row.key + "[]" in models else row.key


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_ft.config.reference [--write PATH]``: print or write the page."""
    parser = argparse.ArgumentParser(
        prog="python -m dist_ft.config.reference",
        description="Print the recipe key reference (markdown), or write it to a file.")
    parser.add_argument("--write", metavar="PATH", default=None,
                        help=f"write the page to PATH (the repo's copy: {DOC_PATH}) instead "
                             "of printing it (default: print)")
    args = parser.parse_args(argv)
    page = render_markdown()
    if args.write is None:
        sys.stdout.write(page)
        return 0
    target = Path(args.write)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    print(f"wrote {target} ({len(key_rows())} keys)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
