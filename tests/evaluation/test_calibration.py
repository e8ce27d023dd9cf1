"""Expected calibration error and reliability bins."""

from __future__ import annotations

import numpy as np
import pytest

from dist_ft.evaluation.calibration import calibration


def test_a_calibrated_predictor_has_near_zero_ece_and_a_shifted_one_does_not() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(50_000)
    targets = (rng.random(50_000) < scores).astype(float)  # Bernoulli(score): calibrated
    assert calibration(scores, targets)["ece"] < 0.02
    assert calibration(np.clip(scores + 0.2, 0, 1), targets)["ece"] > 0.1


def test_bins_describe_the_reliability_diagram() -> None:
    scores = np.array([0.0, 0.05, 0.15, 0.95, 1.0])
    targets = np.array([0, 0, 1, 1, 1])
    out = calibration(scores, targets, bins=10)
    bins = out["bins"]
    assert sum(bins["counts"]) == 5 and bins["counts"][0] == 2 and bins["counts"][9] == 2
    assert bins["mean_predicted"][9] == pytest.approx(0.975)
    assert bins["observed"][1] == 1.0 and np.isnan(bins["observed"][5])
    assert bins["centers"][0] == pytest.approx(0.05)
    # |0.025-0|*2 + |0.15-1|*1 + |0.975-1|*2, over 5
    assert out["ece"] == pytest.approx((0.05 + 0.85 + 0.05) / 5)
    with pytest.raises(ValueError, match="bins"):
        calibration(scores, targets, bins=0)
