"""What ``dist-ft aggregate`` writes into OUT.

- ``scalars.csv``: tidy, one row per group x tag x step x statistic:
  ``group,tag,step,stat,value,members`` (``members``: values behind the point);
- ``tb/<group>/<stat>/``: event files, one TensorBoard run per group and statistic, so
  ``tensorboard --logdir OUT/tb`` overlays e.g. every group's mean;
- ``summary.json``: per group and tag, the final and best value (of the mean) with steps;
- ``plots/<tag>.png``: each chosen tag, one line per group (mean) with a +-std band.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.jsonio import dumps
from dist_ft.logs.aggregate import Aggregate, summarize
from dist_ft.logs.events import write_scalars

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def path_name(text: str) -> str:
    """A group or tag as one path component (``lr=0.001,seed=1``; ``val/loss`` -> ``val_loss``)."""
    return _UNSAFE.sub("_", text).strip("._") or "_"


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def write_csv(results: list[Aggregate], path: Path) -> int:
    """``scalars.csv``; returns the number of rows."""
    rows = 0
    with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as fh:
        fh.write("group,tag,step,stat,value,members\n")
        for agg in results:
            head = f"{_csv_field(agg.group)},{_csv_field(agg.tag)},"
            steps = agg.steps.tolist()
            members = agg.members.tolist()
            for stat, values in agg.stats.items():
                # repr() of a float round-trips exactly; NaN is written as an empty field.
                fh.write("".join(
                    f"{head}{s},{stat},{'' if v != v else repr(v)},{m}\n"
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
    return [write_scalars(folder / path_name(group) / stat, scalars)
            for (group, stat), scalars in sorted(by_run.items())]


def write_summary(results: list[Aggregate], path: Path, extra: dict[str, Any]) -> dict:
    """``summary.json``: final and best values per group and tag, plus ``extra``."""
    doc = {**extra, "groups": summarize(results)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(doc))
    tmp.replace(path)
    return doc


def default_plot_tags(results: list[Aggregate]) -> list[str]:
    """Losses and mean AUROC/score tags, when nothing is asked for."""
    tags = sorted({a.tag for a in results})
    wanted = ("train/loss", "val/loss", "val/auroc_mean", "val/accuracy")
    return [t for t in wanted if t in tags] or tags[:4]


def write_plots(results: list[Aggregate], folder: Path, patterns: list[str] | None) -> list[Path]:
    """One PNG per chosen tag: each group's mean, with a +-std band where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({a.tag for a in results})
    chosen = ([t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
              if patterns else default_plot_tags(results))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for tag in chosen:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        for agg in (a for a in results if a.tag == tag and "mean" in a.stats):
            mean = agg.stats["mean"]
            (line,) = ax.plot(agg.steps, mean, label=f"{agg.group} (n={len(agg.sources)})",
                              linewidth=1.2)
            if "std" in agg.stats and len(agg.sources) > 1:
                std = agg.stats["std"]
                ax.fill_between(agg.steps, mean - std, mean + std, alpha=0.2,
                                color=line.get_color(), linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.set_title(f"{tag}: mean ± std over each group's members")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = folder / f"{path_name(tag)}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
