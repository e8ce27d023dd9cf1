"""Calibration: do predicted probabilities match observed frequencies?"""

from __future__ import annotations

from typing import Any

import numpy as np


def calibration(scores: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability-diagram bins of one class.

    Bins split [0, 1] into ``bins`` equal widths (the last one closed); ECE is the
    count-weighted mean of ``|mean predicted - observed frequency|`` over non-empty bins.

    Args:
        scores: ``[N]`` probabilities in [0, 1].
        targets: ``[N]`` 0/1 labels; NaN (unknown) entries are left out.
        bins: number of equal-width bins.

    Returns:
        ``{"ece", "bins": {"edges", "centers", "mean_predicted", "observed", "counts"}}`` as
        lists; empty bins have NaN mean and frequency and count 0. ECE is NaN when no entry
        has a known target.

    Raises:
        ValueError: ``bins < 1`` or shapes disagree.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if bins < 1:
        raise ValueError(f"bins: expected >= 1, got {bins}")
    if scores.ndim != 1 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets: expected equal [N] shapes, got {scores.shape} "
                         f"and {targets.shape}")
    known = ~np.isnan(targets)
    scores, targets = scores[known], targets[known]
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip((scores * bins).astype(np.int64), 0, bins - 1)  # a score of 1.0: last bin
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=scores, minlength=bins) / counts
        observed = np.bincount(index, weights=targets, minlength=bins) / counts
    filled = counts > 0
    ece = (float(np.sum(counts[filled] * np.abs(mean_predicted - observed)[filled]) / len(scores))
           if len(scores) else float("nan"))
    return {"ece": ece, "bins": {
        "edges": edges.tolist(), "centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "mean_predicted": mean_predicted.tolist(), "observed": observed.tolist(),
        "counts": counts.tolist()}}
