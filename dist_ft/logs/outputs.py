"""What ``dist-ft aggregate`` writes into OUT.

- ``scalars.csv``: tidy, one row per group x tag x step x statistic:
  ``group,tag,step,stat,value,members,label,since_stage`` (``members``: values behind the
  point; ``label``: the tag in words, ``default (no decay) + head (no decay)`` for
  ``lr/default.no_decay+head.no_decay@full``; ``since_stage``: the stage named in such a tag,
  from which that optimizer group's parameters have trained);
- ``tb/<group>/<stat>/``: event files, one TensorBoard run per group and statistic, so
  ``tensorboard --logdir OUT/tb`` overlays e.g. every group's mean;
- ``summary.json``: per group and tag, the final value (of the mean) with its step, and for
  metrics (losses, AUROC, accuracy, F1) the best;
- ``plots/<tag>.png``: each chosen tag, one line per group (mean) with a +-std band; every
  learning rate in one ``plots/lr.png``, a line per optimizer group; dotted lines where the
  runs enter another freeze stage, labelled with its name.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.jsonio import dumps
from dist_ft.logs.aggregate import Aggregate, summarize, tag_label
from dist_ft.logs.events import write_scalars
from dist_ft.plotstyle import line_style

# Folder and file names: no ',' '=' or anything else a shell or a glob acts on (as sweep
# task folders, dist_ft.launch.sweep); '=' reads as '-' (lr=0.001 -> lr-0.001).
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def path_name(text: str) -> str:
    """A group or tag as one path component (``lr=0.001,seed=1`` -> ``lr-0.001_seed-1``;
    ``val/loss`` -> ``val_loss``)."""
    return _UNSAFE.sub("_", text.replace("=", "-")).strip("._-") or "_"


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def unique_names(texts: list[str]) -> dict[str, str]:
    """:func:`path_name` of each text, ``-2``, ``-3``... appended where two would be the same
    file (``a b`` and ``a_b``): two groups never share a folder, two tags never a plot."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for text in texts:
        name, n = path_name(text), 1
        while name in taken:
            n += 1
            name = f"{path_name(text)}-{n}"
        taken.add(name)
        out[text] = name
    return out


def write_csv(results: list[Aggregate], path: Path) -> int:
    """``scalars.csv``; returns the number of rows."""
    rows = 0
    with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as fh:
        fh.write("group,tag,step,stat,value,members,label,since_stage\n")
        for agg in results:
            head = f"{_csv_field(agg.group)},{_csv_field(agg.tag)},"
            named = tag_label(agg.tag)
            tail = f",{_csv_field(named.label)},{_csv_field(named.since_stage)}\n"
            steps = agg.steps.tolist()
            members = agg.members.tolist()
            for stat, values in agg.stats.items():
                # repr() of a float round-trips exactly; NaN is written as an empty field.
                fh.write("".join(
                    f"{head}{s},{stat},{'' if v != v else repr(v)},{m}{tail}"
                    for s, v, m in zip(steps, values.tolist(), members, strict=True)))
                rows += len(steps)
    path.with_name(path.name + ".tmp").replace(path)
    return rows


def write_event_dirs(results: list[Aggregate], folder: Path) -> list[Path]:
    """One event file per group and statistic under ``folder/<group>/<stat>/``."""
    by_run: dict[tuple[str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for agg in results:
        for stat, values in agg.stats.items():
            by_run.setdefault((agg.group, stat), {})[agg.tag] = (agg.steps, values)
    names = unique_names(sorted({group for group, _ in by_run}))
    return [write_scalars(folder / names[group] / stat, scalars)
            for (group, stat), scalars in sorted(by_run.items())]


def write_summary(results: list[Aggregate], path: Path, extra: dict[str, Any]) -> dict:
    """``summary.json``: final (and, for metrics, best) values per group and tag, plus
    ``extra``."""
    doc = {**extra, "groups": summarize(results)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(doc))
    tmp.replace(path)
    return doc


def default_plot_tags(results: list[Aggregate]) -> list[str]:
    """Losses, mean AUROC/accuracy and the learning rates, when nothing is asked for."""
    tags = sorted({a.tag for a in results})
    wanted = ("train/loss", "val/loss", "val/auroc_mean", "val/accuracy")
    chosen = [t for t in wanted if t in tags] or tags[:4]
    return chosen + [t for t in tags if tag_label(t).family == "lr" and t not in chosen]




def _pyplot() -> Any:
    """pyplot on the file-only Agg backend, imported when a plot is made (slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_figure(results: list[Aggregate], tags: list[str],
                boundaries: dict[str, list[tuple[int, str]]] | None = None) -> Any:
    """One figure of ``tags``: each group's mean (else its first statistic) per tag, a +-std
    band where a group has several members, and a dotted vertical line (gid
    ``stage-boundary``), labelled with the stage's name, where the plotted groups' runs enter
    another freeze stage (see :func:`~dist_ft.logs.aggregate.stage_boundaries`).

    A tag in the legend reads as :func:`~dist_ft.logs.aggregate.tag_label` says
    (``default (no decay) + head (no decay), since full``), followed by the group when
    several are plotted; one tag's figure names only the groups.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    shown = [a for a in results if a.tag in tags and a.stats]
    groups = sorted({a.group for a in shown})
    stat = "mean"
    for i, agg in enumerate(shown):
        stat = "mean" if "mean" in agg.stats else next(iter(agg.stats))
        named = tag_label(agg.tag)
        what = named.label + (f", since {named.since_stage}" if named.since_stage else "")
        who = f"{agg.group} (n={len(agg.sources)})"
        text = (who if len(tags) == 1 and what == agg.tag
                else what if len(groups) == 1 else f"{what} · {who}")
        values = agg.stats[stat]
        style = line_style(i)
        ax.plot(agg.steps, values, label=text, linewidth=1.2, **style)
        if stat == "mean" and "std" in agg.stats and len(agg.sources) > 1:
            std = agg.stats["std"]
            ax.fill_between(agg.steps, values - std, values + std, alpha=0.2,
                            color=style["color"], linewidth=0)
    owners: dict[tuple[int, str], list[str]] = {}
    for group in groups:
        for mark in (boundaries or {}).get(group, []):
            owners.setdefault(mark, []).append(group)
    for (step, name), who_has in sorted(owners.items()):
        ax.axvline(step, color="0.35", linestyle=":", linewidth=1.0, gid="stage-boundary")
        note = name if len(who_has) == len(groups) else f"{name} ({', '.join(who_has)})"
        ax.text(step, 0.98, f" {note}", transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=7, color="0.3")
    family = tag_label(tags[0]).family if tags else ""
    ax.set_xlabel("step")
    if family == "lr" and len(tags) > 1:
        ax.set_ylabel("learning rate")
        ax.set_title(f"learning rate per optimizer group ({stat})")
    else:
        ax.set_ylabel(tags[0] if len(tags) == 1 else family)
        ax.set_title(f"{tags[0] if len(tags) == 1 else family}: {stat}"
                     + (" ± std" if stat == "mean" else "") + " over each group's members")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the legend: one beside the axes widens the image instead
    if len(shown) > 6:  # a long legend goes beside the axes, not over the lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif shown:
        ax.legend(fontsize=7, loc="best")
    return fig


def write_plots(results: list[Aggregate], folder: Path, patterns: list[str] | None,
                boundaries: dict[str, list[tuple[int, str]]] | None = None) -> list[Path]:
    """One PNG per chosen tag (``plots/lr.png`` for every chosen learning rate), drawn by
    :func:`plot_figure`; ``boundaries``: each group's stage changes."""
    tags = sorted({a.tag for a in results})
    chosen = ([t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
              if patterns else default_plot_tags(results))
    figures: dict[str, list[str]] = {}
    for tag in chosen:
        figures.setdefault(tag_label(tag).family, []).append(tag)
    names = unique_names(list(figures))
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    for family, family_tags in figures.items():
        fig = plot_figure(results, family_tags, boundaries)
        path = folder / f"{names[family]}.png"
        fig.savefig(path, bbox_inches="tight")  # with the legend beside the axes
        plt.close(fig)
        written.append(path)
    return written
