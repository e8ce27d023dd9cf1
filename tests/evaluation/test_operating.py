"""Operating points chosen on validation and applied unchanged on test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_ft.evaluation.operating import apply_thresholds, choose_thresholds, roc_curve
from tests.evaluation.conftest import synthetic


def test_thresholds_are_chosen_on_val_by_their_definition() -> None:
    val = synthetic(patients=150, seed=10)
    chosen = choose_thresholds(val, sensitivity=0.9)
    for k, name in enumerate(val.classes):
        s, t = val.scores[:, k], val.targets[:, k] == 1
        candidates = np.unique(s)
        sens = np.array([np.mean(s[t] >= c) for c in candidates])
        spec = np.array([np.mean(s[~t] < c) for c in candidates])
        j = sens + spec - 1
        youden = chosen[name]["youden"]
        assert j[candidates == youden][0] == pytest.approx(j.max())
        fixed = chosen[name]["sens@0.90"]
        assert np.mean(s[t] >= fixed) >= 0.9
        assert (sens[candidates > fixed] < 0.9).all()  # no higher threshold reaches 0.90


def test_val_thresholds_are_applied_unchanged_on_test() -> None:
    val, test = synthetic(patients=150, seed=11), synthetic(patients=200, seed=12)
    chosen = choose_thresholds(val, sensitivity=0.8)
    applied = apply_thresholds(test, chosen)
    for k, name in enumerate(test.classes):
        for point in ("youden", "sens@0.80"):
            got = applied[name][point]
            threshold = chosen[name][point]
            assert got["threshold"] == threshold
            called, positive = test.scores[:, k] >= threshold, test.targets[:, k] == 1
            tp, fp = int(np.sum(called & positive)), int(np.sum(called & ~positive))
            fn, tn = int(np.sum(~called & positive)), int(np.sum(~called & ~positive))
            assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (tp, fp, fn, tn)
            assert got["sensitivity"] == pytest.approx(tp / (tp + fn))
            assert got["specificity"] == pytest.approx(tn / (tn + fp))
            assert got["ppv"] == pytest.approx(tp / (tp + fp))
            assert got["npv"] == pytest.approx(tn / (tn + fn))
            assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_class_without_positives_has_no_threshold() -> None:
    val = synthetic(patients=50, seed=13)
    targets = val.targets.copy()
    targets[:, 1] = 0
    val = type(val)(val.scores, targets, val.classes, val.patients, val.images)
    chosen = choose_thresholds(val)
    assert math.isnan(chosen["c1"]["youden"]) and math.isnan(chosen["c1"]["sens@0.90"])
    applied = apply_thresholds(val, chosen)["c1"]["youden"]
    assert math.isnan(applied["sensitivity"]) and applied["tp"] is None


def test_bad_input() -> None:
    test = synthetic(patients=20, seed=14)
    with pytest.raises(ValueError, match=r"classes \['nope'\] are not in the test"):
        apply_thresholds(test, {"nope": {"youden": 0.5}})
    with pytest.raises(ValueError, match="sensitivity"):
        choose_thresholds(test, sensitivity=0)


def test_roc_curve_spans_the_unit_square() -> None:
    fpr, tpr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
