"""MIMIC-CXR-JPG in its real layout: the three CSVs joined, official subject-wise splits."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.config.schema import ChexpertLabelsConfig, DataConfig
from dist_ft.data.datasets import build_dataset, class_names
from dist_ft.data.label_map import CHEXPERT_FINDINGS, SHARED_CHESTXRAY14
from dist_ft.data.metadata import MetadataError

# The label file's real column order: alphabetical after the ids.
LABEL_HEADER = ["subject_id", "study_id", *sorted(CHEXPERT_FINDINGS)]
EDEMA = CHEXPERT_FINDINGS.index("Edema")
META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
               "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"]


def _write(path: Path, rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.fixture
def mimic(tmp_path: Path) -> Path:
    """4 subjects (train x2, validate, test), 2 studies each, PA + LATERAL per study; one
    study of subject 10000032 has no label row; Edema cycles 1/0/-1/blank by study."""
    root = tmp_path / "2.0.0"
    root.mkdir()
    splits = {"10000032": "train", "10000764": "train", "11000011": "validate",
              "19999987": "test"}
    labels, split_rows, meta = [LABEL_HEADER], [["dicom_id", "study_id", "subject_id", "split"]], \
        [META_HEADER]
    k = 0
    for subject, split in splits.items():
        for s in range(2):
            study = f"5{subject[2:]}{s}"
            if not (subject == "10000032" and s == 1):
                cells = [""] * len(CHEXPERT_FINDINGS)
                cells[sorted(CHEXPERT_FINDINGS).index("Edema")] = ["1.0", "0.0", "-1.0", ""][k % 4]
                labels.append([subject, study, *cells])
            k += 1
            for view in ("PA", "LATERAL"):
                dicom = f"d{subject}{s}{view[0]}"
                split_rows.append([dicom, study, subject, split])
                meta.append([dicom, subject, study, "CHEST", view, "32", "32", "21800506", "0"])
                image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / \
                    f"{dicom}.jpg"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (32, 32), 100).save(image)
    _write(root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels)
    _write(root / "mimic-cxr-2.0.0-split.csv.gz", split_rows)
    _write(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    return root


def test_official_splits_joined_labels_and_sample_info(mimic: Path) -> None:
    cfg = DataConfig(format="mimic_cxr", root=str(mimic), image_size=32, load_size=32)
    sets = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    # 16 images; the 2 of the unlabelled study are left out.
    assert {s: len(d) for s, d in sets.items()} == {"train": 6, "val": 4, "test": 4}
    assert set(sets["train"].sample_info["patient"]) == {"10000032", "10000764"}
    assert set(sets["val"].sample_info["patient"]) == {"11000011"}
    info = sets["test"].sample_info
    assert set(info) == {"image", "patient", "view"}
    assert info["image"][0] == "files/p19/p19999987/s59999870/d199999870P.jpg"
    assert list(info["view"]) == ["PA", "LATERAL", "PA", "LATERAL"]
    # Edema per study: train studies k=0 (1.0), k=2 (-1 -> 1 under U-Ones), k=3 (blank -> 0).
    np.testing.assert_array_equal(sets["train"].targets[:, EDEMA], [1, 1, 1, 1, 0, 0])
    image, target = sets["test"][0]
    assert image.shape == (1, 32, 32) and target.shape == (14,)


def test_policies_views_and_mapping(mimic: Path) -> None:
    ignore = build_dataset(DataConfig(format="mimic_cxr", root=str(mimic),
                                      chexpert=ChexpertLabelsConfig(uncertain="ignore")), "train")
    assert np.isnan(ignore.targets[2:4, EDEMA]).all() and ignore.targets[0, EDEMA] == 1
    zeros = build_dataset(DataConfig(format="mimic_cxr", root=str(mimic), chexpert=
                                     ChexpertLabelsConfig(uncertain="zeros")), "train")
    np.testing.assert_array_equal(zeros.targets[:, EDEMA], [1, 1, 0, 0, 0, 0])
    frontal = build_dataset(DataConfig(format="mimic_cxr", root=str(mimic), frontal_only=True),
                            "train")
    assert set(frontal.sample_info["view"]) == {"PA"} and len(frontal) == 3
    cfg = DataConfig(format="mimic_cxr", root=str(mimic), labels_as="chestxray14")
    mapped = build_dataset(cfg, "train")
    assert mapped.classes == list(SHARED_CHESTXRAY14) == class_names(cfg)
    np.testing.assert_array_equal(mapped.targets[:, SHARED_CHESTXRAY14.index("Edema")],
                                  [1, 1, 1, 1, 0, 0])


def test_missing_files_and_bad_split_are_named(mimic: Path) -> None:
    (mimic / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(MetadataError, match=r"no MIMIC-CXR-JPG metadata file "
                                            r"\(mimic-cxr-2\.0\.0-metadata\.csv"):
        build_dataset(DataConfig(format="mimic_cxr", root=str(mimic)), "train")
    _write(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", [META_HEADER])
    _write(mimic / "mimic-cxr-2.0.0-split.csv.gz",
           [["dicom_id", "study_id", "subject_id", "split"], ["d1", "50000001", "10000032", "val"]])
    with pytest.raises(MetadataError, match=r"split\.csv\.gz:2: split 'val'; expected train, "
                                            r"validate or test"):
        build_dataset(DataConfig(format="mimic_cxr", root=str(mimic)), "train")


def test_a_subject_in_two_official_splits_is_refused(mimic: Path) -> None:
    path = mimic / "mimic-cxr-2.0.0-split.csv.gz"
    with gzip.open(path, "rt") as fh:
        rows = list(csv.reader(fh))
    rows[1][3] = "test"  # one image of a train subject moved to test
    _write(path, rows)
    with pytest.raises(MetadataError, match=r"1 patient\(s\) are in more than one split.*"
                                            r"10000032"):
        build_dataset(DataConfig(format="mimic_cxr", root=str(mimic)), "val")
