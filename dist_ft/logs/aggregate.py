"""Aggregate scalars over runs: groups, step alignment, statistics. Pure numpy.

A *member* is one directory of event files (a run's ``tb/``, or one rank's ``tb/rank1/``), with
the resolved recipe of the run it belongs to (``recipe.yaml`` in it or an ancestor). Members
are grouped by ``run`` (all ranks of a run), ``all``, ``dir`` (every member alone) or recipe
keys (``optim.lr``: runs that share that value, e.g. a sweep's seeds). For each group and tag
the members that have the tag are aligned on steps:

- ``intersection``: only steps every such member logged;
- ``union``: every step any member logged; statistics over the members that have it.

Either way each point records ``members``, how many values it was computed from, and
``nonfinite``, how many of them were NaN or +-inf. NaN and inf are data, as TensorBoard shows
them: a statistic over a step where a member logged NaN is NaN, and inf propagates as in numpy
(``mean`` of 1 and inf is inf, of inf and -inf NaN). ``-0.0`` keeps its sign (a lone member's
``-0.0`` has mean, min, max and median ``-0.0``).
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
DEFAULT_STATS = ("mean", "std", "min", "max")  # count is every point's ``members``
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
    members: np.ndarray  # int: values behind each step (NaN and inf included)
    nonfinite: np.ndarray  # int: how many of those values are NaN or +-inf
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


def _compact(value: Any) -> str:
    """A recipe value as a short group label: a list of named items (``plan.stages``,
    ``optim.groups``) by its names, ``head+top+full``; anything else as it is."""
    if isinstance(value, list) and value and all(
            isinstance(v, dict) and "name" in v for v in value):
        return "+".join(str(v["name"]) for v in value)
    return str(value)


def group_label(member: Member, group_by: list[str], root: Path | None,
                compact: bool = False) -> str:
    """The group a member belongs to (``compact``: list values by their items' names).

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
            value = member.params[key]
            parts.append(f"{key}={_compact(value) if compact else value}")
    return ",".join(parts)


def group_members(members: list[Member], group_by: list[str],
                  root: Path | None) -> dict[str, list[Member]]:
    """Members by group label: compact labels (``plan.stages=head+top+full``) unless two
    groups would then read the same, in which case every label is written out in full.

    Raises:
        ValueError: see :func:`group_label`.
    """
    groups: dict[str, list[Member]] = {}
    short: dict[str, str] = {}
    for m in members:
        label = group_label(m, group_by, root)
        groups.setdefault(label, []).append(m)
        short.setdefault(label, group_label(m, group_by, root, compact=True))
    if len(set(short.values())) < len(short):  # compact labels would merge groups
        return groups
    return {short[label]: found for label, found in groups.items()}


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


def _statistic(stat: str, matrix: np.ndarray, present: np.ndarray,
               counts: np.ndarray) -> np.ndarray:
    """One statistic per column over the present rows, NaN and inf included as numpy treats
    them. Sums start from -0.0, the identity that keeps a lone ``-0.0`` negative (numpy's
    column sums start from 0.0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in std: NaN, as numpy
        if stat == "count":
            return counts.astype(np.float64)
        if stat == "min":
            return np.where(present, matrix, np.inf).min(axis=0)
        if stat == "max":
            return np.where(present, matrix, -np.inf).max(axis=0)
        mean = np.sum(np.where(present, matrix, -0.0), axis=0, initial=-0.0) / counts
        if stat == "mean":
            return mean
        if stat == "std":  # population std over members (ddof=0), as numpy's default
            dev = np.where(present, matrix - mean, 0.0)
            return np.sqrt(np.sum(dev * dev, axis=0) / counts)
        if stat == "median":
            # Absent members sort last as NaN; a present NaN makes the column NaN below.
            ordered = np.sort(np.where(present, matrix, np.nan), axis=0)
            lo = np.take_along_axis(ordered, ((counts - 1) // 2)[None], axis=0)[0]
            hi = np.take_along_axis(ordered, (counts // 2)[None], axis=0)[0]
            median = np.where(counts % 2 == 1, lo, (lo + hi) / 2)
            return np.where((present & np.isnan(matrix)).any(axis=0), np.nan, median)
    raise ValueError(f"unknown statistic {stat!r}; known: {', '.join(STATS)}")


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
    matrix = np.zeros((len(series), len(steps)))
    present = np.zeros(matrix.shape, dtype=bool)  # NaN is data, so absence is kept apart
    for row, (_, s) in enumerate(series):
        pos = np.searchsorted(steps, s.steps)
        hit = (pos < len(steps)) & (steps[np.minimum(pos, len(steps) - 1)] == s.steps)
        matrix[row, pos[hit]] = s.values[hit]
        present[row, pos[hit]] = True
    counts = present.sum(axis=0)
    nonfinite = (present & ~np.isfinite(matrix)).sum(axis=0)
    out = {stat: _statistic(stat, matrix, present, counts) for stat in stats}
    return Aggregate(group, tag, steps, counts, nonfinite, out,
                     [str(d) for d, _ in series])


def aggregate(members: list[Member], group_by: list[str], tags: list[str] | None,
              stats: list[str], align: str, root: Path | None = None) -> list[Aggregate]:
    """Every group x tag aggregate, groups and tags in sorted order."""
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"--stats: unknown {', '.join(unknown)}; known: {', '.join(STATS)}")
    if align not in ("intersection", "union"):
        raise ValueError(f"--align: {align!r}; use intersection or union")
    groups = group_members(members, group_by, root)
    results = []
    for group in sorted(groups):
        for tag in select_tags(groups[group], tags):
            agg = aggregate_tag(group, tag, groups[group], stats, align)
            if agg is not None:
                results.append(agg)
    return results


METRIC_TAGS = ("train/loss", "rank/loss")  # plus every val/ and val_auroc/ tag but:
NOT_METRICS = ("val/gap",)  # validation minus training loss: neither end of it is "best"
STAGE_TAG = "train/stage"
NO_DECAY = ".no_decay"


def best_mode(tag: str) -> str | None:
    """Whether lower (``min``) or higher (``max``) is better for a metric: losses, AUROC,
    accuracy, F1 (``train/loss``, ``rank/loss``, ``val/*``, ``val_auroc/*``). None for what
    is not a score: learning rates, speed, gradient norm, stage, the train/validation gap."""
    if tag in NOT_METRICS or not (tag in METRIC_TAGS or tag.startswith(("val/", "val_auroc/"))):
        return None
    low = tag.lower()
    return "min" if any(w in low for w in ("loss", "error", "ece", "brier")) else "max"


@dataclass(frozen=True)
class TagLabel:
    """How a tag reads in ``scalars.csv``, plot legends and ``summary.json``.

    Attributes:
        label: ``default (no decay) + head (no decay)`` for
            ``lr/default.no_decay+head.no_decay@full``; the tag itself for other tags.
        since_stage: ``full``: the stage from which that optimizer group's parameters have
            trained (the trainer splits a group by it); empty when the tag names none.
        family: tags drawn in one plot: ``lr`` for every learning rate, else the tag.
    """

    label: str
    since_stage: str
    family: str


def param_group_label(name: str) -> str:
    """An optimizer group's logged name (``lr/<name>``) in words.

    The name is ``KEY[+KEY...]`` (groups with equal lr and decay merged, dist_ft.plan.groups),
    each ``KEY`` being ``GROUP[.BLOCK][.no_decay]``: ``default.no_decay+head.no_decay`` ->
    ``default (no decay) + head (no decay)``; ``top.layer4`` -> ``top (layer4)``;
    ``head.head`` -> ``head``.
    """
    parts = []
    for key in name.split("+"):
        no_decay = key.endswith(NO_DECAY)
        group, _, block = key.removesuffix(NO_DECAY).partition(".")  # group names hold no "."
        notes = [n for n in (block if block != group else "", "no decay" if no_decay else "")
                 if n]
        parts.append(f"{group or key} ({', '.join(notes)})" if notes else (group or key))
    return " + ".join(parts)


def tag_label(tag: str) -> TagLabel:
    """How ``tag`` reads (the one rule for it): ``lr/<group>[@<stage>]`` as the group's name
    in words and the stage apart; other tags as they are. Tags themselves never change, so
    old runs read the same."""
    if tag.startswith("lr/"):
        name, at, stage = tag[3:].rpartition("@")  # stage names hold no "@"
        return TagLabel(param_group_label(name if at else stage), stage if at else "", "lr")
    return TagLabel(tag, "", tag)


def summarize(results: list[Aggregate]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per group and tag, of the mean (else the first statistic), each with the tag's
    readable label:

    - ``final``: the last finite value, its step and members there;
    - ``best``: for metrics (see :func:`best_mode`), the best finite value;
    - ``first_nonfinite_step``: the first step where that statistic or a member's value is
      NaN or +-inf (None if none), and ``nonfinite_steps``, how many such steps there are:
      ``final`` and ``best`` never hide a NaN.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for agg in results:
        key = "mean" if "mean" in agg.stats else next(iter(agg.stats))
        values = agg.stats[key]
        mode = best_mode(agg.tag)
        ok = np.isfinite(values)
        finite = np.flatnonzero(ok)
        bad = np.flatnonzero(~ok | (agg.nonfinite > 0))
        named = tag_label(agg.tag)
        entry: dict[str, Any] = {"label": named.label, "since_stage": named.since_stage or None,
                                 "stat": key, "members": len(agg.sources),
                                 "steps": len(agg.steps),
                                 "first_nonfinite_step": int(agg.steps[bad[0]]) if len(bad)
                                 else None,
                                 "nonfinite_steps": len(bad)}
        if len(finite):
            last = finite[-1]
            entry["final"] = {"step": int(agg.steps[last]), "value": float(values[last]),
                              "members": int(agg.members[last])}
            if mode is not None:
                best = finite[np.argmin(values[finite]) if mode == "min"
                              else np.argmax(values[finite])]
                entry["best"] = {"step": int(agg.steps[best]), "value": float(values[best]),
                                 "mode": mode}
        out.setdefault(agg.group, {})[agg.tag] = entry
    return out


def stage_boundaries(members: list[Member], group_by: list[str],
                     root: Path | None) -> dict[str, list[tuple[int, str]]]:
    """Where each group's runs enter another freeze stage: sorted ``(step, stage name)``.

    Read from each run's ``train/stage`` (whatever ``--tags`` keeps). The step is the plan's
    ``start_step`` where the recipe has one between the last step logged in the old stage and
    the first in the new, else that first step; the name is the recipe's
    ``plan.stages[i].name`` (``stage i`` without a recipe). Stages entered before the first
    logged point are marked only where the recipe gives their ``start_step``.
    """
    out: dict[str, list[tuple[int, str]]] = {}
    for group, found in group_members(members, group_by, root).items():
        marks: set[tuple[int, str]] = set()
        for m in found:
            series = m.run.series.get(STAGE_TAG)
            if series is None:
                continue
            stages = m.params.get("plan.stages")
            stages = stages if isinstance(stages, list) else []
            ok = np.isfinite(series.values)
            steps, values = series.steps[ok], series.values[ok]
            if not len(steps):
                continue
            # (index, last step logged before it or -1, first step logged in it)
            changes = [(j, -1, int(steps[0])) for j in range(1, int(values[0]) + 1)]
            changes += [(int(values[i + 1]), int(steps[i]), int(steps[i + 1]))
                        for i in np.nonzero(np.diff(values))[0]]
            for index, before, after in changes:
                spec = stages[index] if 0 <= index < len(stages) else {}
                spec = spec if isinstance(spec, dict) else {}
                start = spec.get("start_step")
                if isinstance(start, int) and before <= start < after:
                    marks.add((start, str(spec.get("name", f"stage {index}"))))
                elif before >= 0:  # a stage entered before the first point needs the plan
                    marks.add((after, str(spec.get("name", f"stage {index}"))))
        if marks:
            out[group] = sorted(marks)
    return out
