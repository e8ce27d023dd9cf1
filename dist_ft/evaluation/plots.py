"""Figures of an evaluation: reliability diagrams and ROC curves (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.evaluation.bootstrap import weighted_auroc
from dist_ft.evaluation.calibration import calibration
from dist_ft.evaluation.operating import roc_curve
from dist_ft.evaluation.scored import Scored
from dist_ft.plotstyle import line_style


def _pyplot() -> Any:
    """pyplot on the file-only Agg backend, imported lazily (matplotlib is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(source: dict[str, Any] | Scored, path: str | Path, bins: int = 10) -> Path:
    """Reliability diagrams of every class in one figure (a grid of small panels).

    Args:
        source: an :func:`~dist_ft.evaluation.report.analyze` report (its ``calibration``), a
            ``{class: calibration(...)}`` dict, or predictions to bin here.
        path: the image to write (format from the suffix, e.g. ``.png``).
        bins: bins when ``source`` is predictions.

    Returns:
        ``path``.
    """
    if isinstance(source, Scored):
        curves = {name: calibration(source.scores[:, k], source.targets[:, k], bins)
                  for k, name in enumerate(source.classes)}
    else:
        curves = source.get("calibration", source)
    plt = _pyplot()
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, (name, curve) in zip(axes.ravel(), curves.items(), strict=False):
        b = curve["bins"]
        predicted = np.array(b["mean_predicted"], dtype=np.float64)  # None (JSON null) -> nan
        observed = np.array(b["observed"], dtype=np.float64)
        counts = np.array(b["counts"], dtype=np.float64)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.plot(predicted, observed, marker="o", lw=1)
        ece = curve["ece"]
        ax.set_title(f"{name} (ECE {'n/a' if ece is None else f'{ece:.3f}'})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        # How many images each point stands for: bars up to a quarter of the panel's height
        # (on the same axes: a twin axis per panel doubled the figure's drawing time).
        if counts.max() > 0:
            ax.bar(b["centers"], 0.25 * counts / counts.max(), width=1 / len(counts),
                   alpha=0.15, color="grey")
    for ax in axes.ravel()[len(curves):]:
        ax.axis("off")
    fig.supxlabel("mean predicted probability (grey: images per bin, relative)")
    fig.supylabel("observed frequency")
    # Fixed margins: tight_layout over a grid of panels costs more than drawing them.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, wspace=0.25,
                        hspace=0.35)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)




def roc_figure(scored: Scored) -> Any:
    """The figure :func:`plot_roc` writes: one curve per class, each in its own colour and
    dash (:func:`dist_ft.plotstyle.line_style`), labelled ``Cardiomegaly (AUROC 0.873)``; a
    class without positives or negatives has no curve, only a legend entry saying so.

    Returns:
        The matplotlib figure (close it with ``pyplot.close``).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7))
    for k, name in enumerate(scored.classes):
        known = scored.known[:, k]
        scores, targets = scored.scores[known, k], scored.targets[known, k]
        style = line_style(k)
        if 0 < targets.sum() < len(targets):
            fpr, tpr = roc_curve(scores, targets)
            auroc = weighted_auroc(scores, targets, np.ones(len(scores)))[0]
            ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUROC {auroc:.3f})", **style)
        else:
            missing = "positives" if targets.sum() == 0 else "negatives"
            ax.plot([], [], lw=1.2, label=f"{name} (no AUROC: no {missing})", **style)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC, {len(scored):,} images")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_roc(scored: Scored, path: str | Path) -> Path:
    """ROC curves of every class with positives and negatives, each class's AUROC in the
    legend, one figure (:func:`roc_figure`).

    Entries with an unknown (NaN) target are left out of their class's curve.

    Args:
        scored: the predictions.
        path: the image to write.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig = roc_figure(scored)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
