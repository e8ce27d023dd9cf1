"""``dist-ft bench eval``: how long the patient bootstrap of an evaluation report takes.

The bootstrap (1,000 patient resamples of per-class AUROC and AUPRC) is the part of
:func:`dist_ft.evaluation.report.analyze` whose cost grows with the test set and the resamples;
the rest (calibration, thresholds, markdown) is a few passes over the scores. Synthetic data of
the official ChestX-ray14 test list's size stand in for a model's scores: about 3.5 images per
patient, prevalences from 0.2% to 20% as in the 14 findings, float32 scores as a model emits.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dist_ft.evaluation.bootstrap import patient_bootstrap, weighted_metrics
from dist_ft.evaluation.report import analyze
from dist_ft.evaluation.scored import Scored


def synthetic_scored(images: int = 25596, classes: int = 14, seed: int = 0) -> Scored:
    """Scores that separate positives from negatives moderately (AUROC about 0.75-0.8).

    Args:
        images: rows.
        classes: findings.
        seed: numpy seed.

    Returns:
        A :class:`Scored` with patients (about ``images / 3.5``) and view/sex/age columns.
    """
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, max(1, round(images / 3.5)), size=images)
    prevalence = np.geomspace(0.002, 0.2, classes)
    targets = (rng.random((images, classes)) < prevalence).astype(np.float64)
    logits = rng.normal(size=(images, classes)) + 1.1 * targets - 2.0
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    meta = {"view": rng.choice(["PA", "AP"], size=images), "sex": rng.choice(["M", "F"], images),
            "age": rng.uniform(1, 95, size=images)}
    return Scored(scores, targets, [f"finding{k}" for k in range(classes)],
                  np.char.add("patient", patients.astype(str)),
                  np.char.add("image", np.arange(images).astype(str)), meta)


def bootstrap_timing(images: int = 25596, classes: int = 14, resamples: int = 1000,
                     seed: int = 0, whole: bool = False) -> dict[str, Any]:
    """Seconds to draw the patient bootstrap and score every class on every resample.

    Args:
        images: test images (25,596: the official ChestX-ray14 test list).
        classes: findings.
        resamples: bootstrap resamples.
        seed: seed of the data and of the bootstrap.
        whole: also time the whole :func:`analyze` (subgroups and calibration included).

    Returns:
        ``{"images", "patients", "classes", "resamples", "seconds"}`` and, with ``whole``,
        ``"analyze_seconds"``.

    Raises:
        ValueError: ``images``, ``classes`` or ``resamples`` below 1.
    """
    for name, value in (("images", images), ("classes", classes), ("resamples", resamples)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    scored = synthetic_scored(images, classes, seed)
    start = time.perf_counter()
    weights = patient_bootstrap(scored.patients, resamples, seed)
    weighted_metrics(scored.scores, scored.targets, weights)
    out: dict[str, Any] = {"images": images, "patients": len(np.unique(scored.patients)),
                           "classes": classes, "resamples": resamples,
                           "seconds": time.perf_counter() - start}
    if whole:
        start = time.perf_counter()
        analyze(scored, resamples=resamples, seed=seed)
        out["analyze_seconds"] = time.perf_counter() - start
    return out
