"""The patient bootstrap and the vectorized weighted AUROC/AUPRC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from dist_ft.evaluation.bootstrap import (
    confidence_interval,
    patient_bootstrap,
    row_nanmean,
    weighted_auprc,
    weighted_auroc,
    weighted_metrics,
)
from tests.evaluation.conftest import synthetic


def _direct(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    s, t = torch.from_numpy(scores), torch.from_numpy(targets).long()
    return float(binary_auroc(s, t)), float(binary_average_precision(s, t))


def _rows_of(patients: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(patients == p) for p in np.unique(patients)]


def test_vectorized_metrics_equal_torchmetrics_on_explicitly_resampled_rows() -> None:
    data = synthetic(patients=70, seed=1, decimals=1)  # one decimal: many ties
    rows_of = _rows_of(data.patients)
    rng = np.random.default_rng(123)
    resampled, weights = [], []
    for _ in range(50):  # resample patients by hand: every image of a drawn patient comes along
        rows = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
        resampled.append(rows)
        weights.append(np.bincount(rows, minlength=len(data)))
    weights = np.array(weights)
    for k in range(len(data.classes)):
        scores, targets = data.scores[:, k], data.targets[:, k]
        auroc = weighted_auroc(scores, targets, weights)
        auprc = weighted_auprc(scores, targets, weights)
        for r, rows in enumerate(resampled):
            want_auroc, want_auprc = _direct(scores[rows], targets[rows])
            assert auroc[r] == pytest.approx(want_auroc, abs=1e-6)
            assert auprc[r] == pytest.approx(want_auprc, abs=1e-6)


@pytest.mark.parametrize("decimals", [None, 2, 0])
def test_point_estimate_equals_torchmetrics(decimals: int | None) -> None:
    data = synthetic(patients=80, seed=2, decimals=decimals)
    ones = np.ones(len(data))
    metrics = weighted_metrics(data.scores, data.targets, ones)
    for k in range(len(data.classes)):
        want_auroc, want_auprc = _direct(data.scores[:, k], data.targets[:, k])
        assert metrics["auroc"][0, k] == pytest.approx(want_auroc, abs=1e-6)
        assert metrics["auprc"][0, k] == pytest.approx(want_auprc, abs=1e-6)


def test_patient_bootstrap_draws_whole_patients() -> None:
    data = synthetic(patients=40, seed=3)
    weights = patient_bootstrap(data.patients, resamples=200, seed=7)
    assert weights.shape == (200, len(data)) and weights.dtype == np.int32
    for rows in _rows_of(data.patients):  # all images of a patient share its multiplicity
        assert (weights[:, rows] == weights[:, rows[:1]]).all()
    first = np.array([rows[0] for rows in _rows_of(data.patients)])
    assert (weights[:, first].sum(axis=1) == 40).all()  # as many patient draws as patients
    assert np.array_equal(weights, patient_bootstrap(data.patients, 200, seed=7))
    assert not np.array_equal(weights, patient_bootstrap(data.patients, 200, seed=8))


def _auroc_ci(data, resamples: int = 500, seed: int = 0) -> tuple[float, float, float]:
    weights = patient_bootstrap(data.patients, resamples, seed)
    point = weighted_auroc(data.scores[:, 0], data.targets[:, 0], np.ones(len(data)))[0]
    lo, hi = confidence_interval(weighted_auroc(data.scores[:, 0], data.targets[:, 0], weights))
    return point, lo, hi


def test_ci_contains_point_estimate_and_shrinks_with_more_patients() -> None:
    small = _auroc_ci(synthetic(patients=100, seed=4))
    large = _auroc_ci(synthetic(patients=400, seed=4))
    for point, lo, hi in (small, large):
        assert lo < point < hi
    # 4x the patients: about half the width (1/sqrt(4)).
    assert (large[2] - large[1]) < 0.7 * (small[2] - small[1])


def test_ci_agrees_with_slow_direct_resampling() -> None:
    data = synthetic(patients=120, seed=5)
    scores, targets = data.scores[:, 0], data.targets[:, 0]
    fast = weighted_auroc(scores, targets, patient_bootstrap(data.patients, 2000, seed=0))
    rows_of = _rows_of(data.patients)
    rng = np.random.default_rng(99)  # an independent stream of resamples
    slow = []
    for _ in range(600):
        rows = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
        slow.append(_direct(scores[rows], targets[rows])[0])
    fast_lo, fast_hi = confidence_interval(fast)
    slow_lo, slow_hi = confidence_interval(np.array(slow))
    width = fast_hi - fast_lo
    # Monte Carlo error of a 2.5% percentile from 600 draws is ~0.1 of the width; allow 0.2.
    assert abs(fast_lo - slow_lo) < 0.2 * width
    assert abs(fast_hi - slow_hi) < 0.2 * width
    assert np.std(slow) == pytest.approx(np.std(fast), rel=0.15)


def test_patient_clustering_widens_the_interval_over_an_image_bootstrap() -> None:
    base = synthetic(patients=150, per_patient=(1, 1), classes=1, seed=6, decimals=None)
    copies = 4  # each patient's images are near-duplicates: perfectly correlated
    scores = np.repeat(base.scores, copies, axis=0)
    targets = np.repeat(base.targets, copies, axis=0)
    patients = np.repeat(base.patients, copies)
    ones = np.ones(len(scores))
    assert weighted_auroc(scores[:, 0], targets[:, 0], ones)[0] == pytest.approx(
        weighted_auroc(base.scores[:, 0], base.targets[:, 0], np.ones(len(base)))[0], abs=1e-12)
    images = np.arange(len(scores)).astype(str)

    def width(units: np.ndarray) -> float:
        lo, hi = confidence_interval(
            weighted_auroc(scores[:, 0], targets[:, 0], patient_bootstrap(units, 1000, 0)))
        return hi - lo

    _, lo, hi = _auroc_ci(base, 1000)
    assert width(patients) == pytest.approx(hi - lo, rel=0.2)  # duplicates add no information
    assert width(patients) > 1.6 * width(images)  # an image bootstrap: ~1/sqrt(4) too narrow


def test_undefined_resamples_are_nan_and_intervals_skip_them() -> None:
    scores = np.array([0.1, 0.2, 0.9, 0.8])
    targets = np.array([0, 0, 1, 0])
    weights = np.array([[1, 1, 1, 1], [1, 1, 0, 1], [0, 0, 2, 0]])  # all, no positive, no negative
    auroc = weighted_auroc(scores, targets, weights)
    assert auroc[0] == 1.0 and np.isnan(auroc[1:]).all()
    assert np.isnan(weighted_auprc(scores, targets, weights)[1:]).all()
    assert confidence_interval(np.array([0.5, np.nan, 0.7])) == pytest.approx((0.505, 0.695))
    assert all(np.isnan(confidence_interval(np.array([np.nan, np.nan]))))
    means = row_nanmean(np.array([[0.5, np.nan], [np.nan, np.nan], [0.2, 0.4]]))
    assert means[0] == 0.5 and np.isnan(means[1]) and means[2] == pytest.approx(0.3)


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"weights: expected \[R, 3\]"):
        weighted_auroc(np.zeros(3), np.zeros(3), np.ones((2, 4)))
    with pytest.raises(ValueError, match="scores and targets"):
        weighted_auroc(np.zeros(3), np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="resamples"):
        patient_bootstrap(np.array(["a"]), resamples=0)
    with pytest.raises(ValueError, match="alpha"):
        confidence_interval(np.zeros(3), alpha=1.5)
