"""NaN targets (unknown labels, e.g. CheXpert uncertain with ``uncertain: ignore``).

Every per-class statistic of a class with unknown entries must equal the same statistic on the
data with those rows removed, and leave every other class untouched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dist_ft import jsonio
from dist_ft.evaluation.bootstrap import patient_bootstrap, weighted_metrics
from dist_ft.evaluation.calibration import calibration
from dist_ft.evaluation.compare import paired_comparison
from dist_ft.evaluation.operating import apply_thresholds, choose_thresholds
from dist_ft.evaluation.report import analyze, render_markdown
from dist_ft.evaluation.scored import Scored
from tests.evaluation.conftest import synthetic

K = 1  # the class given unknown entries


def _with_unknown(scored: Scored, fraction: float = 0.3, seed: int = 0,
                  k: int = K) -> tuple[Scored, np.ndarray]:
    """``scored`` with a ``fraction`` of class ``k``'s targets set to NaN, and the kept rows."""
    rng = np.random.default_rng(seed)
    unknown = rng.random(len(scored)) < fraction
    targets = scored.targets.copy()
    targets[unknown, k] = np.nan
    return (Scored(scored.scores, targets, scored.classes, scored.patients, scored.images,
                   scored.meta), np.flatnonzero(~unknown))


@pytest.fixture(scope="module")
def data() -> tuple[Scored, Scored, np.ndarray]:
    full = synthetic(patients=90, classes=3, seed=40, meta=True)
    masked, keep = _with_unknown(full)
    return full, masked, keep


def test_weighted_metrics_leave_unknown_rows_out_of_their_class_only(data) -> None:
    full, masked, keep = data
    weights = patient_bootstrap(full.patients, resamples=60, seed=1)
    got = weighted_metrics(masked.scores, masked.targets, weights)
    untouched = weighted_metrics(full.scores, full.targets, weights)
    removed = weighted_metrics(full.scores[keep], full.targets[keep], weights[:, keep])
    for metric in ("auroc", "auprc"):
        # The same resample restricted to the known rows: identical, resample by resample.
        np.testing.assert_allclose(got[metric][:, K], removed[metric][:, K], rtol=0, atol=1e-12)
        others = [k for k in range(3) if k != K]
        np.testing.assert_array_equal(got[metric][:, others], untouched[metric][:, others])
    assert np.isfinite(got["auroc"]).all()


def test_report_statistics_equal_those_with_the_rows_removed(data) -> None:
    full, masked, keep = data
    report = analyze(masked, resamples=80, seed=0, subgroup_resamples=40)
    removed = analyze(full.take(keep), resamples=80, seed=0, subgroup_resamples=40)
    name = masked.classes[K]
    got, want = report["classes"][name], removed["classes"][name]
    for key in ("positives", "negatives", "auroc", "auprc", "prevalence", "ece"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["unknown"] == len(masked) - len(keep) > 0
    assert got["positives"] + got["negatives"] + got["unknown"] == len(masked)
    assert all(np.isfinite(got[f"{m}_ci"]).all() for m in ("auroc", "auprc"))
    assert got["auroc_ci"][0] < got["auroc"] < got["auroc_ci"][1]
    assert report["calibration"][name] == removed["calibration"][name]
    assert report["classes"]["c0"]["unknown"] == 0
    assert report["classes"]["c0"]["auroc"] == analyze(full, resamples=2)["classes"]["c0"]["auroc"]
    # Subgroups: the class's subgroup AUROC is that of the subgroup's known rows.
    for value, group in report["subgroups"]["sex"].items():
        mask = masked.meta["sex"] == value
        part = full.take(mask & np.isin(np.arange(len(full)), keep))
        point = weighted_metrics(part.scores, part.targets, np.ones((1, len(part))), False)
        assert group["classes"][name]["auroc"] == pytest.approx(point["auroc"][0, K], abs=1e-12)
        assert group["classes"][name]["unknown"] == int(np.isnan(masked.targets[mask, K]).sum())
    text = render_markdown(report)
    assert "| finding | pos | neg | unknown |" in text
    assert f"| {name} | {got['positives']} | {got['negatives']} | {got['unknown']} |" in text
    assert "unknown |" not in render_markdown(removed).split("### Subgroups")[0]


def test_calibration_leaves_unknown_out(data) -> None:
    full, masked, keep = data
    assert (calibration(masked.scores[:, K], masked.targets[:, K])
            == calibration(full.scores[keep, K], full.targets[keep, K]))
    assert math.isnan(calibration(np.array([0.2, 0.4]), np.array([np.nan, np.nan]))["ece"])


def test_operating_points_leave_unknown_out_on_val_and_test(data) -> None:
    full, masked, keep = data
    val_full = synthetic(patients=70, classes=3, seed=41)
    val_masked, val_keep = _with_unknown(val_full, seed=2)
    name = masked.classes[K]
    chosen = choose_thresholds(val_masked)
    assert chosen[name] == choose_thresholds(val_full.take(val_keep))[name]
    assert chosen["c0"] == choose_thresholds(val_full)["c0"]
    got = apply_thresholds(masked, chosen)[name]
    want = apply_thresholds(full.take(keep), chosen)[name]
    assert got == want
    youden = got["youden"]
    assert youden["tp"] + youden["fp"] + youden["tn"] + youden["fn"] == len(keep)


def test_paired_comparison_leaves_unknown_out(data) -> None:
    full, masked, keep = data
    noisy = np.clip(full.scores + np.random.default_rng(3).normal(0, 0.2, full.scores.shape), 0, 1)
    other = Scored(noisy, masked.targets, masked.classes, masked.patients, masked.images)
    order = np.arange(len(masked))[::-1]  # a row order of its own: aligned by image id
    comparison = paired_comparison(masked, other.take(order), resamples=60)
    removed = paired_comparison(full.take(keep), Scored(noisy[keep], full.targets[keep],
                                                        full.classes, full.patients[keep],
                                                        full.images[keep]), resamples=60)
    got, want = comparison["classes"][masked.classes[K]], removed["classes"][masked.classes[K]]
    for key in ("auroc_a", "auroc_b", "difference"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    assert np.isfinite(got["ci"]).all() and comparison["excluded"] == []


def test_a_class_whose_known_labels_are_all_one_value_is_undefined() -> None:
    base = synthetic(patients=50, classes=3, seed=42)
    targets = base.targets.copy()
    targets[:, 2] = np.where(targets[:, 2] == 1, np.nan, 0.0)  # positives unknown: all 0
    scored = Scored(base.scores, targets, base.classes, base.patients, base.images)
    report = analyze(scored, val=scored, resamples=30)
    c2 = report["classes"]["c2"]
    assert c2["positives"] == 0 and c2["unknown"] == int(base.targets[:, 2].sum()) > 0
    assert math.isnan(c2["auroc"]) and math.isnan(c2["auprc"]) and report["excluded"] == ["c2"]
    assert "unknown" in report["notes"][0] and report["mean"]["classes"] == 2
    assert report["mean"]["auroc"] == pytest.approx(
        np.mean([report["classes"][n]["auroc"] for n in ("c0", "c1")]))
    assert math.isnan(report["operating_points"]["thresholds"]["c2"]["youden"])
    assert json.loads(jsonio.dumps(report))["classes"]["c2"]["auroc"] is None


def test_plots_accept_unknown_labels(data, tmp_path: Path) -> None:
    from dist_ft.evaluation.plots import plot_reliability, plot_roc

    _, masked, _ = data
    for path in (plot_roc(masked, tmp_path / "roc.png"),
                 plot_reliability(masked, tmp_path / "rel.png")):
        assert path.read_bytes()[:4] == b"\x89PNG"
