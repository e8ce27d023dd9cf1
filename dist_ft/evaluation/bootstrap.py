"""Patient-level (cluster) bootstrap and weighted AUROC/AUPRC, vectorized over resamples.

A resample draws *patients* with replacement and brings every image of a drawn patient along,
because a patient's images are correlated: resampling images alone would pretend they are
independent and give intervals that are too narrow. A resample is then a vector of image
multiplicities, so a metric on a resample is a weighted metric on the original rows. Each class
is sorted once; every resample is a row of an ``[R, N]`` weight matrix, and AUROC and average
precision come from weighted cumulative sums over the sorted order (ties grouped), a few matrix
passes per class instead of a sort per resample.
"""

from __future__ import annotations

import numpy as np

# Resamples handled per pass: bounds memory to a few [CHUNK, N] float64 matrices (~13 MB each
# for 25,596 images) while keeping the numpy passes long enough to be efficient.
CHUNK = 128


def patient_bootstrap(patients: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Image multiplicities of ``resamples`` cluster-bootstrap resamples over patients.

    Each resample draws as many patients as there are, with replacement; an image's weight is
    the number of times its patient was drawn.

    Args:
        patients: ``[N]`` patient id of every image (the image id when unknown).
        resamples: number of resamples ``R``.
        seed: seed of numpy's ``default_rng``; the same seed and patients give the same weights.

    Returns:
        ``[R, N]`` int32 weights.

    Raises:
        ValueError: ``patients`` is empty or not one-dimensional, or ``resamples < 1``.

    >>> patient_bootstrap(np.array(["a", "a", "b"]), resamples=2, seed=0).shape
    (2, 3)
    """
    patients = np.asarray(patients)
    if patients.ndim != 1 or len(patients) == 0:
        raise ValueError(f"patients: expected a non-empty [N] array, got shape {patients.shape}")
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1, got {resamples}")
    _, inverse = np.unique(patients, return_inverse=True)
    inverse = inverse.ravel()
    count = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, size=(resamples, count))
    offsets = (np.arange(resamples) * count)[:, None]
    per_patient = np.bincount((draws + offsets).ravel(), minlength=resamples * count)
    return per_patient.reshape(resamples, count).astype(np.int32)[:, inverse]


def _auroc_auprc(scores: np.ndarray, targets: np.ndarray, weights_t: np.ndarray,
                 want_auprc: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Weighted AUROC and average precision of one class for every column of ``weights_t``.

    Sorting by score once, the images fall into tie groups; only groups holding a positive
    ("events") add to AUROC or AP. Each needs its own positive and negative weight and the
    weight below it, so the sorted images are cut at every event boundary and summed per
    segment (one ``reduceat`` pass), and the cumulative sums run over the few segments, not
    the images. ``weights_t`` is ``[N, R]`` (image-major): gathering its rows in score order
    copies contiguous runs of resamples.

    A NaN target (unknown for this class) weighs 0 in every resample: its row is left out of
    the sorted order, so the gather below never reads it and the cost does not grow.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if scores.ndim != 1 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets: expected equal [N] shapes, got {scores.shape} "
                         f"and {targets.shape}")
    if weights_t.shape[0] != len(scores):
        raise ValueError(f"weights: expected [R, {len(scores)}], got {weights_t.T.shape}")
    resamples = weights_t.shape[1]
    auroc = np.full(resamples, np.nan)
    auprc = np.full(resamples, np.nan) if want_auprc else None
    known = ~np.isnan(targets)
    if known.all():
        order = np.argsort(scores, kind="stable")
    else:
        rows = np.flatnonzero(known)
        order = rows[np.argsort(scores[rows], kind="stable")]
    ranked = scores[order]
    positive = targets[order] == 1
    pos_rows = np.flatnonzero(positive)
    if len(pos_rows) == 0:  # also when every target is unknown
        return auroc, auprc
    group_start = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1]
    group_end = np.r_[group_start[1:], len(ranked)]
    group_of_pos = np.searchsorted(group_start, pos_rows, side="right") - 1
    events = np.unique(group_of_pos)  # tie groups with a positive, ascending
    cuts = np.unique(np.r_[0, group_start[events], group_end[events]])
    cuts = cuts[cuts < len(ranked)]
    event_segment = np.searchsorted(cuts, group_start[events])
    first_pos = np.r_[0, np.flatnonzero(np.diff(group_of_pos)) + 1]  # each event's first positive
    for lo in range(0, resamples, CHUNK):
        w = np.ascontiguousarray(weights_t[order, lo:lo + CHUNK].T, dtype=np.float64)
        segment = np.add.reduceat(w, cuts, axis=1)
        below = np.cumsum(segment, axis=1) - segment  # weight strictly below each segment
        pos = np.add.reduceat(w[:, pos_rows], first_pos, axis=1)  # per event
        pos_below = np.cumsum(pos, axis=1) - pos
        neg = segment[:, event_segment] - pos
        neg_below = below[:, event_segment] - pos_below
        total_pos = pos.sum(axis=1)
        total_neg = segment.sum(axis=1) - total_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            # Each positive beats the negatives strictly below it and half of those tied with it.
            auroc[lo:lo + CHUNK] = ((pos * (neg_below + 0.5 * neg)).sum(axis=1)
                                    / (total_pos * total_neg))
            if auprc is not None:
                # Thresholds descend through the groups: at an event everything scoring >= it
                # is called positive; recall steps by pos / total_pos (sklearn's step-wise AP).
                true_pos = total_pos[:, None] - pos_below
                called = true_pos + (total_neg[:, None] - neg_below)
                precision = np.divide(true_pos, called, out=np.zeros_like(called),
                                      where=called > 0)
                auprc[lo:lo + CHUNK] = (pos * precision).sum(axis=1) / total_pos
        # No positive or no negative weight: undefined (NaN), never a misleading 0 or 1.
        undefined = (total_pos == 0) | (total_neg == 0)
        auroc[lo:lo + CHUNK][undefined] = np.nan
        if auprc is not None:
            auprc[lo:lo + CHUNK][undefined] = np.nan
    return auroc, auprc


def _image_major(weights: np.ndarray) -> np.ndarray:
    """``[R, N]`` (or ``[N]``) weights as a contiguous ``[N, R]`` matrix."""
    return np.ascontiguousarray(np.atleast_2d(weights).T)


def weighted_auroc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under each row of image weights (ties count one half).

    Equal to the AUROC of the rows repeated ``weights[r]`` times. With ``weights`` all ones it
    is the point estimate.

    Args:
        scores: ``[N]`` scores.
        targets: ``[N]`` 0/1 labels; NaN (unknown) entries are left out (weight 0).
        weights: ``[R, N]`` non-negative weights (e.g. from :func:`patient_bootstrap`), or ``[N]``.

    Returns:
        ``[R]`` AUROCs; NaN where a resample has no positive or no negative weight.

    Raises:
        ValueError: shapes disagree.
    """
    return _auroc_auprc(scores, targets, _image_major(weights), want_auprc=False)[0]


def weighted_auprc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision of one class under each row of image weights.

    Step-wise, as scikit-learn's ``average_precision_score`` and torchmetrics'
    ``binary_average_precision``: the sum over distinct thresholds of the recall step times
    the precision there.

    Args:
        scores: ``[N]`` scores.
        targets: ``[N]`` 0/1 labels; NaN (unknown) entries are left out (weight 0).
        weights: ``[R, N]`` non-negative weights, or ``[N]``.

    Returns:
        ``[R]`` average precisions; NaN where a resample has no positive or no negative weight.

    Raises:
        ValueError: shapes disagree.
    """
    auprc = _auroc_auprc(scores, targets, _image_major(weights))[1]
    assert auprc is not None  # asked for; not user input
    return auprc


def weighted_metrics(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                     auprc: bool = True) -> dict[str, np.ndarray]:
    """AUROC (and AUPRC) of every class under every row of ``weights``.

    Args:
        scores: ``[N, C]`` scores.
        targets: ``[N, C]`` 0/1 labels; a NaN entry is left out of its class only.
        weights: ``[R, N]`` image weights.
        auprc: also compute average precision.

    Returns:
        ``{"auroc": [R, C]}`` and, with ``auprc``, ``"auprc": [R, C]``.
    """
    weights_t = _image_major(weights)
    columns = [_auroc_auprc(scores[:, k], targets[:, k], weights_t, want_auprc=auprc)
               for k in range(scores.shape[1])]
    out = {"auroc": np.stack([c[0] for c in columns], axis=1)}
    if auprc:
        out["auprc"] = np.stack([c[1] for c in columns], axis=1)
    return out


def confidence_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of bootstrap ``values``, ignoring NaN resamples.

    Args:
        values: ``[R]`` statistic per resample.
        alpha: 1 - coverage (0.05: a 95% interval).

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` when no resample is finite.

    Raises:
        ValueError: ``alpha`` not in (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha}")
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries; NaN for a row with none (no warning).

    Used for the per-resample mean AUROC: a resample that drew no positive of a rare class
    averages the classes it can score.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    sums = np.where(finite, values, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)
