"""Subgroup masks: every image in exactly one subgroup per column."""

from __future__ import annotations

import numpy as np
import pytest

from dist_ft.evaluation.subgroups import subgroup_masks


def test_subgroups_partition_the_images_including_unknown() -> None:
    meta = {"view": np.array(["PA", "AP", "", None, "PA", "nan"], dtype=object),
            "sex": np.array(["M", "F", "F", "M", "F", "M"]),
            "age": np.array([5.0, 25.0, np.nan, 85.0, 250.0, 61.0])}
    masks = subgroup_masks(meta)
    assert list(masks["view"]) == ["AP", "PA", "unknown"]
    assert masks["view"]["unknown"].sum() == 3
    assert set(masks["sex"]) == {"M", "F"}
    assert list(masks["age"]) == ["0-19", "20-39", "60-79", "80+", "unknown"]
    assert np.flatnonzero(masks["age"]["unknown"]).tolist() == [2, 4]  # NaN and out of band
    for column in masks.values():
        stacked = np.stack(list(column.values()))
        assert (stacked.sum(axis=0) == 1).all()  # counts add up to the whole, no overlap


def test_columns_absent_from_meta_are_absent() -> None:
    assert subgroup_masks({"sex": np.array(["F"])}).keys() == {"sex"}


def test_overlapping_bands_are_refused() -> None:
    with pytest.raises(ValueError, match=r"age_bands\[1\]"):
        subgroup_masks({"age": np.array([1.0])}, age_bands=((0, 30), (20, 40)))
