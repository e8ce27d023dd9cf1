"""Paired comparison of two models on the same images."""

from __future__ import annotations

import numpy as np
import pytest

from dist_ft.evaluation.compare import paired_comparison
from dist_ft.evaluation.scored import Scored
from tests.evaluation.conftest import synthetic


def test_a_model_against_itself_differs_by_exactly_zero() -> None:
    data = synthetic(patients=80, seed=20)
    out = paired_comparison(data, data, resamples=300, seed=1)
    for c in [*out["classes"].values(), out["mean"]]:
        assert c["difference"] == 0 and c["ci"] == [0, 0] and c["p_value"] == 1


def test_a_clearly_better_model_has_an_interval_above_zero() -> None:
    good = synthetic(patients=150, separation=2.0, seed=21)
    rng = np.random.default_rng(0)
    noisy = np.clip(good.scores + rng.normal(0, 0.3, good.scores.shape), 0, 1)
    worse = Scored(noisy, good.targets, good.classes, good.patients, good.images)
    out = paired_comparison(good, worse, resamples=500, seed=0)
    assert out["mean"]["difference"] > 0 and out["mean"]["ci"][0] > 0
    assert out["mean"]["p_value"] < 0.01
    assert all(c["ci"][0] > 0 for c in out["classes"].values())


def test_rows_in_another_order_are_aligned_and_other_images_refused() -> None:
    a = synthetic(patients=60, seed=22)
    shuffled = a.take(np.random.default_rng(0).permutation(len(a)))
    assert paired_comparison(a, shuffled, resamples=50)["mean"]["ci"] == [0, 0]
    fewer = a.take(np.arange(len(a) - 1))
    with pytest.raises(ValueError, match=r"1 only in the first \(e.g. \['img"):
        paired_comparison(a, fewer, resamples=10)
    flipped = Scored(a.scores, 1 - a.targets, a.classes, a.patients, a.images)
    with pytest.raises(ValueError, match="other targets for 1"):
        paired_comparison(a, flipped, resamples=10)
    moved = Scored(a.scores, a.targets, a.classes, np.r_[["x"], a.patients[1:]], a.images)
    with pytest.raises(ValueError, match=r"other patients for 1 images, e\.g\. 'img00000'"):
        paired_comparison(a, moved, resamples=10)
