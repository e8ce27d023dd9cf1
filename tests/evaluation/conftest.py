"""Synthetic scored predictions with known structure, for the evaluation tests."""

from __future__ import annotations

import numpy as np

from dist_ft.evaluation.scored import Scored


def synthetic(patients: int = 60, per_patient: tuple[int, int] = (1, 4), classes: int = 3,
              prevalence: float = 0.3, separation: float = 1.0, seed: int = 0,
              decimals: int | None = 2, meta: bool = False) -> Scored:
    """Images grouped by patient; a class's scores are higher for its positives.

    ``decimals`` rounds scores so that ties occur (the tie handling is then exercised).
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(per_patient[0], per_patient[1] + 1, size=patients)
    patient = np.repeat([f"p{i:04d}" for i in range(patients)], counts)
    n = len(patient)
    targets = (rng.random((n, classes)) < prevalence).astype(np.float64)
    logits = rng.normal(size=(n, classes)) + separation * targets
    scores = 1 / (1 + np.exp(-logits))
    if decimals is not None:
        scores = scores.round(decimals)
    columns: dict[str, np.ndarray] = {}
    if meta:
        columns = {"view": rng.choice(["PA", "AP", ""], size=n),
                   "sex": rng.choice(["M", "F"], size=n),
                   "age": np.where(rng.random(n) < 0.1, np.nan, rng.uniform(0, 100, size=n))}
    return Scored(scores, targets, [f"c{k}" for k in range(classes)], patient,
                  np.array([f"img{i:05d}" for i in range(n)]), columns)
