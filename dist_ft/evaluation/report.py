"""One test-set evaluation as a JSON-able report, and its markdown rendering.

:func:`analyze` gathers every statistic of :mod:`dist_ft.evaluation` on one patient bootstrap:
per-class AUROC and AUPRC with 95% intervals, their mean over the classes that can be scored,
calibration, subgroups (on the same resamples restricted to the subgroup's images), operating
points chosen on validation, and a paired comparison with another model. Undefined values (a
class without positives) are NaN in the dict; write it with :func:`dist_ft.jsonio.dumps`,
which turns them into ``null``. A NaN target means the label is unknown for that class (e.g.
a CheXpert uncertain label with ``data.chexpert.uncertain: ignore``): every statistic of that
class leaves the entry out, and the report counts such entries per class (``"unknown"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_ft.evaluation.bootstrap import (
    confidence_interval,
    patient_bootstrap,
    row_nanmean,
    weighted_metrics,
)
from dist_ft.evaluation.calibration import calibration
from dist_ft.evaluation.compare import align, compare_with_weights
from dist_ft.evaluation.operating import apply_thresholds, choose_thresholds
from dist_ft.evaluation.references import OFFICIAL_SPLIT_NOTE
from dist_ft.evaluation.scored import Scored
from dist_ft.evaluation.subgroups import AGE_BANDS, subgroup_masks

__all__ = ["analyze", "render_markdown"]

# Subgroups reuse the first resamples of the main bootstrap (restricted to their images): three
# columns of subgroups cost three more passes over the test set, so fewer resamples keep the
# whole report to seconds; their intervals are wider-grained, not biased.
SUBGROUP_RESAMPLES = 500


def _defined(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    return (positives > 0) & (negatives > 0)


def _auroc_block(scored: Scored, weights: np.ndarray, auprc: bool) -> dict[str, Any]:
    """Per-class and mean AUROC (and AUPRC) with intervals on ``weights``; the report's core.

    Also returns the ``[R, C]`` bootstrap AUROCs under ``"boot_auroc"`` (not JSON: popped by
    the caller) for the paired comparison to reuse.
    """
    positives = (scored.targets == 1).sum(axis=0)
    negatives = (scored.targets == 0).sum(axis=0)
    unknown = len(scored) - positives - negatives
    defined = _defined(positives, negatives)
    point = weighted_metrics(scored.scores, scored.targets, np.ones((1, len(scored))), auprc)
    boot = weighted_metrics(scored.scores, scored.targets, weights, auprc)
    metrics = ("auroc", "auprc") if auprc else ("auroc",)
    classes: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(scored.classes):
        row: dict[str, Any] = {"positives": int(positives[k]), "negatives": int(negatives[k]),
                               "unknown": int(unknown[k])}
        for metric in metrics:
            row[metric] = float(point[metric][0, k])
            row[f"{metric}_ci"] = (list(confidence_interval(boot[metric][:, k])) if defined[k]
                                   else [math.nan, math.nan])
        classes[name] = row
    mean: dict[str, Any] = {"classes": int(defined.sum())}
    for metric in metrics:
        if defined.any():
            mean[metric] = float(point[metric][0, defined].mean())
            mean[f"{metric}_ci"] = list(confidence_interval(row_nanmean(boot[metric][:, defined])))
        else:
            mean[metric], mean[f"{metric}_ci"] = math.nan, [math.nan, math.nan]
    excluded = [name for k, name in enumerate(scored.classes) if not defined[k]]
    return {"classes": classes, "mean": mean, "excluded": excluded, "boot_auroc": boot["auroc"]}


def analyze(test: Scored, val: Scored | None = None, other: Scored | None = None, *,
            resamples: int = 1000, seed: int = 0, sensitivity: float = 0.9, bins: int = 10,
            split: str = "test", subgroup_resamples: int = SUBGROUP_RESAMPLES,
            age_bands: Sequence[tuple[float, float]] = AGE_BANDS) -> dict[str, Any]:
    """Every statistic of one model on one split, on one patient bootstrap.

    Args:
        test: the predictions evaluated.
        val: validation predictions of the same model: operating points are chosen there and
            applied unchanged to ``test``.
        other: another model's predictions on the same images: paired AUROC comparison
            (``test`` minus ``other``) on the same resamples.
        resamples: patient-bootstrap resamples.
        seed: bootstrap seed.
        sensitivity: target sensitivity of the fixed-sensitivity operating point.
        bins: calibration bins.
        split: the split's name, said in headings.
        subgroup_resamples: resamples used for subgroups (the first of the main ones, at most
            ``resamples``).
        age_bands: ``[lo, hi)`` age bands of the age subgroups.

    Returns:
        ``{"split", "images", "patients", "resamples", "seed", "classes": {name:
        {"positives", "negatives", "unknown", "auroc", "auroc_ci", "auprc", "auprc_ci",
        "prevalence", "ece"}}, "mean": {"classes", "auroc", "auroc_ci", "auprc", "auprc_ci"},
        "excluded", "notes", "calibration": {name: {"ece", "bins"}}, "subgroups": {column:
        {value: {"images", "patients", "classes": {name: {"positives", "negatives", "unknown",
        "auroc", "auroc_ci"}}, "mean", "excluded"}}}}``, plus ``"operating_points"`` with
        ``val`` and ``"comparison"`` with ``other``. ``unknown`` counts the entries whose
        target is NaN, left out of that class's statistics (prevalence is over the known ones).

    Raises:
        ValueError: ``val`` has other classes than ``test``, or ``other`` is not scored on the
            same images, classes and targets.
    """
    if val is not None and val.classes != test.classes:
        raise ValueError(f"val has other classes than test: {val.classes} vs {test.classes}")
    if other is not None:
        other = align(test, other)
    weights = patient_bootstrap(test.patients, resamples, seed)
    core = _auroc_block(test, weights, auprc=True)
    boot_auroc = core.pop("boot_auroc")
    curves = {name: calibration(test.scores[:, k], test.targets[:, k], bins)
              for k, name in enumerate(test.classes)}
    for name in test.classes:
        row = core["classes"][name]
        known = row["positives"] + row["negatives"]
        row["prevalence"] = row["positives"] / known if known else math.nan
        row["ece"] = curves[name]["ece"]
    notes = [f"{name}: {c['positives']} positives and {c['negatives']} negatives"
             + (f" ({c['unknown']} unknown)" if c["unknown"] else "")
             + f" in {split}; AUROC and AUPRC are undefined (null) and left out of the mean"
             for name, c in core["classes"].items() if name in core["excluded"]]
    report: dict[str, Any] = {
        "split": split, "images": len(test), "patients": len(np.unique(test.patients)),
        "resamples": resamples, "seed": seed, "classes": core["classes"], "mean": core["mean"],
        "excluded": core["excluded"], "notes": notes, "calibration": curves,
    }
    sub_weights = weights[:max(1, min(subgroup_resamples, resamples))]
    subgroups: dict[str, dict[str, Any]] = {}
    for column, masks in subgroup_masks(test.meta, age_bands).items():
        subgroups[column] = {}
        for value, mask in masks.items():
            part = test.take(mask)
            block = _auroc_block(part, sub_weights[:, mask], auprc=False)
            del block["boot_auroc"]
            subgroups[column][value] = {"images": len(part),
                                        "patients": len(np.unique(part.patients)), **block}
    report["subgroups"] = subgroups
    report["subgroup_resamples"] = int(sub_weights.shape[0])
    if val is not None:
        thresholds = choose_thresholds(val, sensitivity)
        report["operating_points"] = {
            "chosen_on": {"images": len(val), "patients": len(np.unique(val.patients))},
            "sensitivity": sensitivity, "thresholds": thresholds,
            "test": apply_thresholds(test, thresholds)}
    if other is not None:
        report["comparison"] = {"a": "this model", "b": "other model",
                                **compare_with_weights(test, other, weights, boot_auroc)}
    return report


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_ci(value: Any, ci: Sequence[Any]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{_num(value)} [{_num(ci[0])}, {_num(ci[1])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A markdown table; the first ``left`` columns left-aligned, the rest right-aligned."""
    align_row = ["---"] * left + ["---:"] * (len(header) - left)
    return (["| " + " | ".join(header) + " |", "|" + "|".join(align_row) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _findings_section(report: dict[str, Any], references: dict[str, dict] | None) -> list[str]:
    classes = report["classes"]
    refs = {name: ref for name, ref in (references or {}).items()
            if set(ref.get("auroc", {})) & set(classes)}
    # Reports from before unknown labels were counted have no "unknown": read as 0.
    unknown = any(c.get("unknown") for c in classes.values())
    header = ["finding", "pos", "neg", *(["unknown"] if unknown else []), "AUROC [95% CI]",
              "AUPRC [95% CI]", "ECE", *refs]
    rows = []
    for name, c in classes.items():
        rows.append([name, str(c["positives"]), str(c["negatives"]),
                     *([str(c.get("unknown", 0))] if unknown else []),
                     _with_ci(c["auroc"], c["auroc_ci"]), _with_ci(c["auprc"], c["auprc_ci"]),
                     _num(c.get("ece")),
                     *[_num(ref["auroc"].get(name)) for ref in refs.values()]])
    scored = [name for name in classes if name not in report["excluded"]]
    mean = report["mean"]
    ref_means = [_num(float(np.mean([ref["auroc"][n] for n in scored if n in ref["auroc"]]))
                      if any(n in ref["auroc"] for n in scored) else None)
                 for ref in refs.values()]
    rows.append([f"**mean ({mean['classes']} findings)**", "", "", *([""] if unknown else []),
                 f"**{_with_ci(mean['auroc'], mean['auroc_ci'])}**",
                 f"**{_with_ci(mean['auprc'], mean['auprc_ci'])}**", "",
                 *[f"**{m}**" for m in ref_means]])
    lines = ["### Per finding", "", *_table(header, rows), ""]
    if unknown:
        lines += ["- unknown: images whose label is unknown (NaN) for that finding, e.g. "
                  "uncertain with `data.chexpert.uncertain: ignore`; left out of every "
                  "statistic of that finding (AUROC, AUPRC, ECE, operating points, subgroups, "
                  "comparison)"]
    lines += [f"- {note}" for note in report.get("notes", [])]
    if refs:
        lines += ["", "Reference columns are published AUROCs, not like-for-like:"]
        lines += [f"- {name}: {ref.get('split', 'split not stated')}" for name, ref in refs.items()]
        lines += [f"- {OFFICIAL_SPLIT_NOTE}"]
    return [*lines, ""]


def _operating_section(report: dict[str, Any]) -> list[str]:
    ops = report["operating_points"]
    chosen = ops["chosen_on"]
    lines = [f"### Operating points (thresholds chosen on validation: {chosen['images']:,} "
             f"images, {chosen['patients']:,} patients; applied unchanged to "
             f"{report['split']})", ""]
    header = ["finding", "point", "threshold", "sensitivity", "specificity", "PPV", "NPV", "F1",
              "TP", "FP", "TN", "FN"]
    rows = []
    for name, points in ops["test"].items():
        for point, m in points.items():
            rows.append([name, point, _num(m["threshold"], 4),
                         *[_num(m[k]) for k in ("sensitivity", "specificity", "ppv", "npv",
                                                "f1")],
                         *["n/a" if m[k] is None else str(m[k]) for k in ("tp", "fp", "tn",
                                                                          "fn")]])
    return [*lines, *_table(header, rows, left=2), ""]


def _subgroup_section(report: dict[str, Any]) -> list[str]:
    groups = [(column, value, g) for column, values in report["subgroups"].items()
              for value, g in values.items()]
    lines = [f"### Subgroups ({report['subgroup_resamples']:,} resamples of the same "
             "patient bootstrap, restricted to each subgroup)", ""]
    rows = [[column, value, f"{g['images']:,}", f"{g['patients']:,}",
             _with_ci(g["mean"]["auroc"], g["mean"]["auroc_ci"]), str(g["mean"]["classes"])]
            for column, value, g in groups]
    lines += _table(["column", "subgroup", "images", "patients", "mean AUROC [95% CI]",
                     "findings scored"], rows, left=2)
    lines += ["", "AUROC per finding and subgroup (n/a: no positives or no negatives there):",
              ""]
    header = ["finding", *[f"{column}={value}" for column, value, _ in groups]]
    rows = [[name, *[_num(g["classes"][name]["auroc"]) for _, _, g in groups]]
            for name in report["classes"]]
    return [*lines, *_table(header, rows), ""]


def _comparison_section(report: dict[str, Any]) -> list[str]:
    comp = report["comparison"]
    lines = [f"### Comparison: {comp['a']} (A) minus {comp['b']} (B), paired patient "
             f"bootstrap ({comp['resamples']:,} resamples)", ""]
    header = ["finding", "AUROC A", "AUROC B", "A - B [95% CI]", "p"]
    rows = [[name, _num(c["auroc_a"]), _num(c["auroc_b"]), _with_ci(c["difference"], c["ci"]),
             _num(c["p_value"], 4)] for name, c in comp["classes"].items()]
    m = comp["mean"]
    rows.append(["**mean**", _num(m["auroc_a"]), _num(m["auroc_b"]),
                 f"**{_with_ci(m['difference'], m['ci'])}**", _num(m["p_value"], 4)])
    return [*lines, *_table(header, rows), ""]


def render_markdown(report: dict[str, Any], references: dict[str, dict] | None = None) -> str:
    """A readable markdown rendering of an :func:`analyze` report.

    Args:
        report: the dict from :func:`analyze` (or its JSON, where NaN became null).
        references: published results to show beside the AUROCs, shaped like
            :data:`dist_ft.evaluation.references.REFERENCES`; only those sharing class names
            with the report are shown.

    Returns:
        Markdown: a heading with the split, image and patient counts and resamples, then the
        per-finding table, operating points (with validation), subgroups (with meta) and the
        comparison (with another model).
    """
    lines = [f"## Evaluation on {report['split']}: {report['images']:,} images, "
             f"{report['patients']:,} patients, 95% intervals from {report['resamples']:,} "
             f"patient-bootstrap resamples (seed {report['seed']})", ""]
    lines += _findings_section(report, references)
    if "operating_points" in report:
        lines += _operating_section(report)
    if report.get("subgroups"):
        lines += _subgroup_section(report)
    if "comparison" in report:
        lines += _comparison_section(report)
    return "\n".join(lines).rstrip() + "\n"
