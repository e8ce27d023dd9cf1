"""Paired comparison of two models on the same images, with a paired patient bootstrap.

Both models are scored on the *same* resample each time, so the interval of the difference
reflects only how the models disagree, not the test set's sampling noise twice over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_ft.evaluation.bootstrap import (
    confidence_interval,
    patient_bootstrap,
    row_nanmean,
    weighted_metrics,
)
from dist_ft.evaluation.scored import Scored


def align(a: Scored, b: Scored) -> Scored:
    """``b`` with its rows in ``a``'s image order, after checking both describe the same data.

    Raises:
        ValueError: other classes, other images (naming a few), or other targets or patients
            for the same image.
    """
    if a.classes != b.classes:
        raise ValueError(f"the two models have other classes: {a.classes} vs {b.classes}; "
                         "compare predictions of the same label set")
    if not np.array_equal(a.images, b.images):
        only_a = np.setdiff1d(a.images, b.images)
        only_b = np.setdiff1d(b.images, a.images)
        if len(only_a) or len(only_b):
            raise ValueError(
                f"the two models were scored on other images: {len(only_a)} only in the first "
                f"(e.g. {only_a[:3].tolist()}), {len(only_b)} only in the second (e.g. "
                f"{only_b[:3].tolist()}); score both on the same split")
        position = {image: i for i, image in enumerate(b.images)}
        b = b.take(np.array([position[image] for image in a.images]))
    same = (a.targets == b.targets) | (np.isnan(a.targets) & np.isnan(b.targets))
    rows = np.flatnonzero(~same.all(axis=1))
    if len(rows):
        raise ValueError(f"the two models have other targets for {len(rows)} images, e.g. "
                         f"{str(a.images[rows[0]])!r}; were they scored with the same label file?")
    rows = np.flatnonzero(a.patients != b.patients)
    if len(rows):
        raise ValueError(f"the two models give other patients for {len(rows)} images, e.g. "
                         f"{str(a.images[rows[0]])!r}: {str(a.patients[rows[0]])!r} vs "
                         f"{str(b.patients[rows[0]])!r}")
    return b


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``difference == 0``: twice the smaller tail, at most 1.

    Each tail counts the resamples at or beyond 0 plus one, over resamples plus one, so the
    p-value is never an impossible 0 from a finite number of resamples.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan")
    tail = min(np.sum(d <= 0), np.sum(d >= 0))
    return float(min(1.0, 2 * (tail + 1) / (len(d) + 1)))


def _summary(a: np.ndarray, b: np.ndarray, point_a: float, point_b: float) -> dict[str, Any]:
    difference = a - b
    return {"auroc_a": point_a, "auroc_b": point_b, "difference": point_a - point_b,
            "ci": list(confidence_interval(difference)),
            "p_value": bootstrap_p_value(difference)}


def compare_with_weights(a: Scored, b: Scored, weights: np.ndarray,
                         boot_a: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`paired_comparison` on given bootstrap weights (``b`` already aligned to ``a``).

    ``boot_a``, ``a``'s ``[R, C]`` AUROCs on ``weights`` when already computed, saves a pass.
    """
    ones = np.ones((1, len(a)))
    point_a = weighted_metrics(a.scores, a.targets, ones, auprc=False)["auroc"][0]
    point_b = weighted_metrics(b.scores, b.targets, ones, auprc=False)["auroc"][0]
    if boot_a is None:
        boot_a = weighted_metrics(a.scores, a.targets, weights, auprc=False)["auroc"]
    boot_b = weighted_metrics(b.scores, b.targets, weights, auprc=False)["auroc"]
    defined = np.isfinite(point_a)
    classes = {name: _summary(boot_a[:, k], boot_b[:, k], float(point_a[k]), float(point_b[k]))
               for k, name in enumerate(a.classes)}
    if defined.any():
        mean = _summary(row_nanmean(boot_a[:, defined]), row_nanmean(boot_b[:, defined]),
                        float(point_a[defined].mean()),
                        float(point_b[defined].mean()))
    else:
        mean = _summary(np.full(1, np.nan), np.full(1, np.nan), float("nan"), float("nan"))
    return {"images": len(a), "patients": len(np.unique(a.patients)),
            "resamples": int(weights.shape[0]), "classes": classes, "mean": mean,
            "excluded": [name for k, name in enumerate(a.classes) if not defined[k]]}


def paired_comparison(a: Scored, b: Scored, resamples: int = 1000, seed: int = 0
                      ) -> dict[str, Any]:
    """AUROC difference ``a - b`` per class and in the mean, with a paired patient bootstrap.

    Args:
        a: the first model's predictions.
        b: the second model's on the same images (any row order).
        resamples: patient-bootstrap resamples, shared by both models.
        seed: bootstrap seed.

    Returns:
        ``{"images", "patients", "resamples", "seed", "classes": {name: {"auroc_a",
        "auroc_b", "difference", "ci": [lo, hi], "p_value"}}, "mean": {...}, "excluded"}``;
        classes without positives or negatives are NaN and left out of the mean. A NaN
        (unknown) target is left out of its class for both models.

    Raises:
        ValueError: the two are not predictions on the same images, classes and targets.
    """
    b = align(a, b)
    out = compare_with_weights(a, b, patient_bootstrap(a.patients, resamples, seed))
    out["seed"] = seed
    return out
