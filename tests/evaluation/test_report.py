"""analyze(): the whole report, its JSON, markdown and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dist_ft import jsonio
from dist_ft.evaluation.plots import plot_reliability, plot_roc
from dist_ft.evaluation.references import REFERENCES
from dist_ft.evaluation.report import analyze, render_markdown
from dist_ft.evaluation.scored import Scored
from tests.evaluation.conftest import synthetic


@pytest.fixture(scope="module")
def report() -> dict:
    test = synthetic(patients=120, classes=4, seed=30, meta=True)
    targets = test.targets.copy()
    targets[:, 2] = 0  # a finding absent from this split
    test = Scored(test.scores, targets, test.classes, test.patients, test.images, test.meta)
    val = synthetic(patients=80, classes=4, seed=31)
    noisy = np.clip(test.scores + np.random.default_rng(0).normal(0, 0.2, test.scores.shape),
                    0, 1)
    other = Scored(noisy, test.targets, test.classes, test.patients, test.images)
    return analyze(test, val=val, other=other, resamples=200, seed=0, split="test")


def test_classes_without_positives_are_null_and_left_out_of_the_mean(report: dict) -> None:
    c2 = report["classes"]["c2"]
    assert c2["positives"] == 0 and math.isnan(c2["auroc"]) and math.isnan(c2["auprc"])
    assert report["excluded"] == ["c2"] and "c2" in report["notes"][0]
    defined = [report["classes"][n]["auroc"] for n in ("c0", "c1", "c3")]
    assert report["mean"]["auroc"] == pytest.approx(np.mean(defined))
    assert report["mean"]["classes"] == 3
    for name in ("c0", "c1", "c3"):
        c = report["classes"][name]
        assert c["auroc_ci"][0] < c["auroc"] < c["auroc_ci"][1]
        assert c["auprc_ci"][0] < c["auprc"] < c["auprc_ci"][1]
    lo, hi = report["mean"]["auroc_ci"]
    assert lo < report["mean"]["auroc"] < hi
    assert json.loads(jsonio.dumps(report))["classes"]["c2"]["auroc"] is None


def test_report_sections(report: dict) -> None:
    assert report["images"] == sum(g["images"] for g in report["subgroups"]["view"].values())
    for column in ("view", "sex", "age"):
        groups = report["subgroups"][column]
        assert sum(g["images"] for g in groups.values()) == report["images"]
    assert "unknown" in report["subgroups"]["age"]
    assert set(report["operating_points"]["test"]["c0"]) == {"youden", "sens@0.90"}
    assert report["comparison"]["mean"]["difference"] > 0
    assert report["calibration"]["c0"]["ece"] == report["classes"]["c0"]["ece"]


def test_markdown_renders_every_section(report: dict) -> None:
    text = render_markdown(report, references=REFERENCES)
    assert "120 patients" in text and "200 patient-bootstrap resamples" in text
    for heading in ("### Per finding", "### Operating points", "### Subgroups",
                    "### Comparison"):
        assert heading in text
    assert "| c2 | 0 |" in text and "n/a" in text
    assert "Wang et al." not in text  # references on other classes are left out
    # The JSON round trip (NaN -> null) renders the same.
    assert render_markdown(json.loads(jsonio.dumps(report))) == render_markdown(report)


def test_markdown_with_published_references() -> None:
    names = list(REFERENCES["CheXNet 2017"]["auroc"])
    base = synthetic(patients=60, classes=len(names), seed=32)
    scored = Scored(base.scores, base.targets, names, base.patients, base.images)
    text = render_markdown(analyze(scored, resamples=50), references=REFERENCES)
    assert "| CheXNet 2017 |" in text and "0.925" in text  # Cardiomegaly
    assert "not the official test list" in text and "0.80-0.83" in text
    assert "### Subgroups" not in text and "### Comparison" not in text


def test_plots_write_png_files(report: dict, tmp_path: Path) -> None:
    scored = synthetic(patients=40, classes=4, seed=33)
    for path in (plot_reliability(report, tmp_path / "rel.png"),
                 plot_reliability(scored, tmp_path / "rel2.png"),
                 plot_roc(scored, tmp_path / "roc.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_legend_names_each_class_with_its_auroc_in_its_own_style() -> None:
    import matplotlib.pyplot as plt

    from dist_ft.evaluation.plots import roc_figure

    names = list(REFERENCES["CheXNet 2017"]["auroc"])  # ChestX-ray14's 14 findings
    base = synthetic(patients=60, classes=len(names), seed=34)
    targets = base.targets.copy()
    targets[:, -1] = 0  # one finding without positives: no curve, said so
    scored = Scored(base.scores, targets, names, base.patients, base.images)
    fig = roc_figure(scored)
    try:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        classes = analyze(scored, resamples=10)["classes"]
        assert legend[:-1] == [f"{n} (AUROC {classes[n]['auroc']:.3f})" for n in names[:-1]]
        assert legend[-1] == f"{names[-1]} (no AUROC: no positives)"
        curves = ax.get_legend().get_lines()
        styles = {(tuple(ln.get_color()), ln.get_linestyle()) for ln in curves}
        assert len(styles) == len(names)  # no two classes drawn alike
        assert len({tuple(ln.get_color()) for ln in curves}) == len(names)  # colours alone
    finally:
        plt.close(fig)


def test_val_with_other_classes_is_refused() -> None:
    test, val = synthetic(patients=20, classes=2), synthetic(patients=20, classes=3)
    with pytest.raises(ValueError, match="val has other classes"):
        analyze(test, val=val, resamples=10)
