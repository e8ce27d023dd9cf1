"""Operating points: thresholds chosen on validation, applied unchanged on test.

Choosing a threshold on the test set itself and reporting sensitivity there is optimistic; the
threshold is a part of the model, so it is fixed on validation data and only evaluated on test.
An image is called positive when its score is >= the threshold. An image whose target is
unknown (NaN) for a class counts for neither the threshold nor the metrics of that class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dist_ft.evaluation.scored import Scored


def confusion_curve(scores: np.ndarray, targets: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at every distinct threshold, highest threshold first.

    Args:
        scores: ``[N]`` scores.
        targets: ``[N]`` 0/1 labels; NaN (unknown) entries are left out.

    Returns:
        ``(thresholds, tp, fp)``: at ``thresholds[k]``, ``tp[k]`` positives and ``fp[k]``
        negatives score ``>= thresholds[k]``; ``tp[-1]`` and ``fp[-1]`` are all positives and
        negatives (both 0, one threshold of NaN, when no target is known).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    known = ~np.isnan(targets)
    scores, targets = scores[known], targets[known]
    if len(scores) == 0:
        return np.array([np.nan]), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    positive = targets[order] == 1
    last = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # end of each tie
    tp = np.cumsum(positive)[last]
    fp = np.cumsum(~positive)[last]
    return ranked[last], tp, fp


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates from (0, 0) to (1, 1); NaN rates without both labels."""
    _, tp, fp = confusion_curve(scores, targets)
    positives, negatives = tp[-1], fp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def sensitivity_key(sensitivity: float) -> str:
    """The name of the fixed-sensitivity point, e.g. ``sens@0.90``."""
    return f"sens@{sensitivity:.2f}"


def choose_thresholds(val: Scored, sensitivity: float = 0.9) -> dict[str, dict[str, float]]:
    """Per class, the Youden threshold and the threshold reaching ``sensitivity``, on ``val``.

    Youden's J (sensitivity + specificity - 1) is maximised over the distinct scores (the
    highest such threshold on a tie). The fixed-sensitivity threshold is the highest one whose
    validation sensitivity is >= ``sensitivity``.

    Args:
        val: validation predictions.
        sensitivity: target sensitivity in (0, 1].

    Returns:
        ``{class: {"youden": t, "sens@0.90": t}}``; NaN where a class lacks the positives (and,
        for Youden, the negatives) to define it.

    Raises:
        ValueError: ``sensitivity`` not in (0, 1].
    """
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity: expected a value in (0, 1], got {sensitivity}")
    key = sensitivity_key(sensitivity)
    chosen: dict[str, dict[str, float]] = {}
    for k, name in enumerate(val.classes):
        thresholds, tp, fp = confusion_curve(val.scores[:, k], val.targets[:, k])
        positives, negatives = int(tp[-1]), int(fp[-1])
        youden = fixed = math.nan
        if positives > 0:
            # sensitivity grows as the threshold falls; the first index reaching it is the highest.
            fixed = float(thresholds[np.argmax(tp / positives >= sensitivity - 1e-12)])
            if negatives > 0:
                youden = float(thresholds[np.argmax(tp / positives - fp / negatives)])
        chosen[name] = {"youden": youden, key: fixed}
    return chosen


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def point_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion counts and the rates derived from them at one threshold (score >= t: positive).

    Entries with a NaN (unknown) target count in no cell.

    Returns:
        ``threshold, sensitivity, specificity, ppv, npv, f1, tp, fp, tn, fn``; rates with a zero
        denominator, and everything for a NaN threshold, are NaN (counts None).
    """
    if math.isnan(threshold):
        return {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan,
                "ppv": math.nan, "npv": math.nan, "f1": math.nan,
                "tp": None, "fp": None, "tn": None, "fn": None}
    called = np.asarray(scores) >= threshold
    positive = np.asarray(targets) == 1
    negative = np.asarray(targets) == 0  # NaN (unknown) is neither
    tp = int(np.sum(called & positive))
    fp = int(np.sum(called & negative))
    fn = int(np.sum(~called & positive))
    tn = int(np.sum(~called & negative))
    return {"threshold": float(threshold), "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def apply_thresholds(test: Scored, thresholds: dict[str, dict[str, float]]
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """Evaluate thresholds (from :func:`choose_thresholds` on validation) unchanged on ``test``.

    Args:
        test: test predictions.
        thresholds: ``{class: {point name: threshold}}``.

    Returns:
        ``{class: {point name: point_metrics(...)}}``.

    Raises:
        ValueError: a class in ``thresholds`` is not one of ``test.classes``.
    """
    unknown = [name for name in thresholds if name not in test.classes]
    if unknown:
        raise ValueError(f"thresholds: classes {unknown} are not in the test predictions "
                         f"({', '.join(test.classes)}); choose them on the same classes")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, points in thresholds.items():
        k = test.classes.index(name)
        out[name] = {point: point_metrics(test.scores[:, k], test.targets[:, k], float(t))
                     for point, t in points.items()}
    return out
