"""Subgroups of a test set by view, sex and age band, for per-subgroup performance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNKNOWN = "unknown"
AGE_BANDS: tuple[tuple[float, float], ...] = ((0, 20), (20, 40), (40, 60), (60, 80), (80, 200))
_MISSING = {"", "nan", "none", "unknown", "na", "n/a"}


def _band_label(lo: float, hi: float) -> str:
    """``[20, 40)`` -> ``20-39``; an open-ended last band (``hi >= 120``) -> ``80+``."""
    return f"{lo:g}+" if hi >= 120 else f"{lo:g}-{hi - 1:g}"


def _category_masks(values: np.ndarray) -> dict[str, np.ndarray]:
    text = np.array([("" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
                     .strip() for v in values], dtype=object)
    missing = np.array([t.lower() in _MISSING for t in text], dtype=bool)
    masks = {str(v): (text == v) & ~missing for v in sorted(set(text[~missing].tolist()))}
    if missing.any():
        masks[UNKNOWN] = missing
    return masks


def subgroup_masks(meta: dict[str, np.ndarray],
                   age_bands: Sequence[tuple[float, float]] = AGE_BANDS
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Boolean masks of each subgroup, per meta column present.

    Every image lands in exactly one subgroup of each column: missing values (None, NaN,
    empty, ``unknown``) and ages outside every band go to ``"unknown"``, which appears only
    when non-empty, so the counts of a column add up to the whole.

    Args:
        meta: ``[N]`` columns ``view`` and ``sex`` (str) and ``age`` (float, NaN unknown), any
            subset (as in :class:`~dist_ft.evaluation.scored.Scored`).
        age_bands: ``[lo, hi)`` years, ascending and disjoint.

    Returns:
        ``{"view": {"AP": mask, "PA": mask}, "sex": {...}, "age": {"0-19": mask, ...,
        "80+": mask, "unknown": mask}}``; empty age bands are left out.

    Raises:
        ValueError: bands that are empty, unordered or overlapping.
    """
    bands = [(float(lo), float(hi)) for lo, hi in age_bands]
    for i, (lo, hi) in enumerate(bands):
        if not lo < hi or (i and lo < bands[i - 1][1]):
            raise ValueError(f"age_bands[{i}] = ({lo:g}, {hi:g}): bands must be [lo, hi) with "
                             "lo < hi, ascending and disjoint, e.g. ((0, 20), (20, 40))")
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in ("view", "sex"):
        if key in meta:
            out[key] = _category_masks(np.asarray(meta[key], dtype=object))
    if "age" in meta:
        age = np.asarray(meta["age"], dtype=np.float64)
        masks: dict[str, np.ndarray] = {}
        banded = np.zeros(len(age), dtype=bool)
        for lo, hi in bands:
            mask = (age >= lo) & (age < hi)  # NaN compares False: it stays unbanded
            banded |= mask
            if mask.any():
                masks[_band_label(lo, hi)] = mask
        if not banded.all():
            masks[UNKNOWN] = ~banded
        out["age"] = masks
    return out
