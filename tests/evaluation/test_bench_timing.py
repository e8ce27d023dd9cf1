"""The evaluation benchmark runs and reports its sizes."""

from __future__ import annotations

import pytest

from dist_ft.bench.evaluation import bootstrap_timing, synthetic_scored
from dist_ft.evaluation.bootstrap import weighted_auroc


def test_bootstrap_timing_reports_sizes_and_seconds() -> None:
    out = bootstrap_timing(images=700, classes=3, resamples=40, whole=True)
    assert (out["images"], out["classes"], out["resamples"]) == (700, 3, 40)
    assert 150 <= out["patients"] <= 200 and out["seconds"] > 0 and out["analyze_seconds"] > 0
    with pytest.raises(ValueError, match="resamples: expected >= 1"):
        bootstrap_timing(resamples=0)


def test_synthetic_scores_are_informative() -> None:
    scored = synthetic_scored(images=4000, classes=2)
    auroc = weighted_auroc(scored.scores[:, 1], scored.targets[:, 1], [1.0] * 4000)[0]
    assert 0.7 < auroc < 0.85
