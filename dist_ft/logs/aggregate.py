"""Aggregate scalars over runs: groups, step alignment, statistics. Pure numpy.

A *member* is one directory of event files (a run's ``tb/``, or one rank's ``tb/rank1/``), with
the resolved recipe of the run it belongs to (``recipe.yaml`` in it or an ancestor). Members
are grouped by ``run`` (all ranks of a run), ``all``, ``dir`` (every member alone) or recipe
keys (``optim.lr``: runs that share that value, e.g. a sweep's seeds). For each group and tag
the members that have the tag are aligned on steps:

- ``intersection``: only steps every such member logged;
- ``union``: every step any member logged; statistics over the members that have it.

Either way each point records ``members``, how many values it was computed from.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.logs.events import RunScalars

STATS = ("mean", "min", "max", "std", "median", "count")
GROUP_KEYWORDS = ("run", "all", "dir")


@dataclass
class Member:
    """One event directory, the run it belongs to and that run's flattened recipe."""

    run: RunScalars
    run_dir: Path
    params: dict[str, Any]


@dataclass
class Aggregate:
    """One group x tag: aligned steps, per-step member counts and statistics."""

    group: str
    tag: str
    steps: np.ndarray
    members: np.ndarray  # int: values behind each step
    stats: dict[str, np.ndarray]
    sources: list[str]  # member directories


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def group_label(member: Member, group_by: list[str], root: Path | None) -> str:
    """The group a member belongs to.

    Raises:
        ValueError: a recipe key that the member's run does not have (names both).
    """
    if group_by == ["all"]:
        return "all"
    parts = []
    for key in group_by:
        if key == "run":
            parts.append(_relative(member.run_dir, root))
        elif key == "dir":
            parts.append(_relative(member.run.directory, root))
        else:
            if key not in member.params:
                raise ValueError(
                    f"--group-by {key}: run {member.run_dir} has no such recipe key"
                    + ("" if member.params else " (no recipe.yaml found above its event files)"))
            parts.append(f"{key}={member.params[key]}")
    return ",".join(parts)


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            rel = path.relative_to(root)
            return str(rel) if str(rel) != "." else path.name
        except ValueError:
            pass
    return str(path)


def select_tags(members: list[Member], patterns: list[str] | None) -> list[str]:
    """Tags present in any member that match any glob (all tags without patterns)."""
    tags = sorted({t for m in members for t in m.run.series})
    if not patterns:
        return tags
    return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]


def aggregate_tag(group: str, tag: str, members: list[Member], stats: list[str],
                  align: str) -> Aggregate | None:
    """Statistics of one tag over the members of one group (None if no member has it)."""
    series = [(m.run.directory, m.run.series[tag]) for m in members if tag in m.run.series]
    if not series:
        return None
    all_steps = [s.steps for _, s in series]
    if align == "intersection":
        steps = all_steps[0]
        for other in all_steps[1:]:
            steps = np.intersect1d(steps, other, assume_unique=True)
    else:
        steps = np.unique(np.concatenate(all_steps))
    if not len(steps):
        return None
    matrix = np.full((len(series), len(steps)), np.nan)
    for row, (_, s) in enumerate(series):
        pos = np.searchsorted(steps, s.steps)
        hit = (pos < len(steps)) & (steps[np.minimum(pos, len(steps) - 1)] == s.steps)
        matrix[row, pos[hit]] = s.values[hit]
    present = ~np.isnan(matrix)
    counts = present.sum(axis=0)
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of one value has no spread
        for stat in stats:
            if stat == "mean":
                out[stat] = np.nanmean(matrix, axis=0)
            elif stat == "min":
                out[stat] = np.nanmin(matrix, axis=0)
            elif stat == "max":
                out[stat] = np.nanmax(matrix, axis=0)
            elif stat == "std":  # population std over members (ddof=0), as numpy's default
                out[stat] = np.nanstd(matrix, axis=0)
            elif stat == "median":
                out[stat] = np.nanmedian(matrix, axis=0)
            elif stat == "count":
                out[stat] = counts.astype(np.float64)
    return Aggregate(group, tag, steps, counts, out, [str(d) for d, _ in series])


def aggregate(members: list[Member], group_by: list[str], tags: list[str] | None,
              stats: list[str], align: str, root: Path | None = None) -> list[Aggregate]:
    """Every group x tag aggregate, groups and tags in sorted order."""
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"--stats: unknown {', '.join(unknown)}; known: {', '.join(STATS)}")
    if align not in ("intersection", "union"):
        raise ValueError(f"--align: {align!r}; use intersection or union")
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(group_label(m, group_by, root), []).append(m)
    results = []
    for group in sorted(groups):
        for tag in select_tags(groups[group], tags):
            agg = aggregate_tag(group, tag, groups[group], stats, align)
            if agg is not None:
                results.append(agg)
    return results


def best_mode(tag: str) -> str:
    """Whether lower or higher is better for a tag: ``min`` for losses, errors and gaps."""
    low = tag.lower()
    return "min" if any(w in low for w in ("loss", "error", "gap", "lr/")) else "max"


def summarize(results: list[Aggregate]) -> dict[str, dict[str, dict[str, Any]]]:
    """Final and best values (of the mean, where present) per group and tag."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for agg in results:
        key = "mean" if "mean" in agg.stats else next(iter(agg.stats))
        values = agg.stats[key]
        mode = best_mode(agg.tag)
        finite = np.where(np.isfinite(values))[0]
        entry: dict[str, Any] = {"stat": key, "members": len(agg.sources),
                                 "steps": len(agg.steps)}
        if len(finite):
            best = finite[np.argmin(values[finite]) if mode == "min"
                          else np.argmax(values[finite])]
            last = finite[-1]
            entry.update(final={"step": int(agg.steps[last]), "value": float(values[last]),
                                "members": int(agg.members[last])},
                         best={"step": int(agg.steps[best]), "value": float(values[best]),
                               "mode": mode})
        out.setdefault(agg.group, {})[agg.tag] = entry
    return out
