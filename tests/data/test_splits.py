"""Patient-wise splits: no leakage, deterministic, label-balanced, official lists honoured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_ft.data.metadata import MetadataError, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    TEST,
    TRAIN,
    VAL,
    patient_overlap,
    resolve_splits,
    stratified_group_split,
)
from tests.conftest import REAL_CXR14


@pytest.fixture(scope="module")
def real_meta():
    return read_metadata(REAL_CXR14 / "Data_Entry_2017.csv.gz")


def test_fraction_split_of_the_real_metadata(real_meta, tmp_path: Path) -> None:
    split = resolve_splits(real_meta, tmp_path, 0.1, 0.2, seed=0)
    assert patient_overlap(real_meta.patients, split) == 0
    counts = np.bincount(split, minlength=3) / len(split)
    assert counts == pytest.approx([0.7, 0.1, 0.2], abs=0.01)
    # Label-balanced as far as patient grouping allows: every finding's prevalence per split
    # within 10% (relative) of its overall prevalence; Hernia (227 images) within 15%.
    overall = real_meta.labels.mean(0)
    for part in (TRAIN, VAL, TEST):
        prevalence = real_meta.labels[split == part].mean(0)
        assert np.all(np.abs(prevalence / overall - 1) < 0.15), part
        assert np.median(np.abs(prevalence / overall - 1)) < 0.03
    again = resolve_splits(real_meta, tmp_path, 0.1, 0.2, seed=0)
    other = resolve_splits(real_meta, tmp_path, 0.1, 0.2, seed=1)
    assert np.array_equal(split, again) and not np.array_equal(split, other)


def test_official_lists_define_test_and_val_is_carved_patient_wise(
    real_meta, tmp_path: Path
) -> None:
    patients = np.unique(real_meta.patients)
    rng = np.random.default_rng(0)
    test_patients = set(rng.choice(patients, 3000, replace=False).tolist())
    is_test = np.isin(real_meta.patients, list(test_patients))
    unlisted = 5  # rows in neither list are excluded
    (tmp_path / "test_list.txt").write_text("\n".join(real_meta.images[is_test]) + "\n")
    (tmp_path / "train_val_list.txt").write_text(
        "\n".join(real_meta.images[~is_test][unlisted:]) + "\n"
    )
    split = resolve_splits(real_meta, tmp_path, 0.1, 0.5, seed=0)
    assert np.array_equal(split == TEST, is_test)
    assert int((split == EXCLUDED).sum()) == unlisted
    assert patient_overlap(real_meta.patients, split) == 0
    share = (split == VAL).sum() / ((split == VAL) | (split == TRAIN)).sum()
    assert share == pytest.approx(0.1, abs=0.01)


def test_list_naming_an_unknown_image_is_an_error(real_meta, tmp_path: Path) -> None:
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n99999999_000.png\n")
    with pytest.raises(MetadataError, match=r"test_list\.txt: 1 image\(s\).*'99999999_000\.png'"):
        resolve_splits(real_meta, tmp_path, 0.1, 0.2, seed=0)


def test_groups_stay_whole_on_small_inputs() -> None:
    labels = np.eye(5, dtype=np.uint8)[np.arange(40) % 5]
    groups = np.arange(40) // 4
    parts = stratified_group_split(labels, groups, [0.5, 0.25, 0.25], seed=7)
    for g in np.unique(groups):
        assert len(set(parts[groups == g].tolist())) == 1
    assert set(parts.tolist()) == {0, 1, 2}
