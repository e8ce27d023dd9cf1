"""MIMIC-CXR-JPG 2.0.0 (Johnson et al. 2019) as PhysioNet distributes it.

Layout (``data.root`` is the ``mimic-cxr-jpg/2.0.0`` folder)::

    ROOT/mimic-cxr-2.0.0-chexpert.csv(.gz)   subject_id, study_id, 14 CheXpert findings
    ROOT/mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split
    ROOT/mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/files/p10/p10000032/s50414267/<dicom_id>.jpg

One row per image of the split file; labels are per study (joined on subject and study), the
view per image. The official subject-wise split (``train``/``validate``/``test``) is used as it
is. Images of studies the labeller did not label are left out (logged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dist_ft.config.schema import DataConfig
from dist_ft.data.label_map import CHEXPERT_FINDINGS, apply_uncertain, parse_chexpert_value
from dist_ft.data.metadata import MetadataError
from dist_ft.data.splits import EXCLUDED, TEST, TRAIN, VAL
from dist_ft.data.table import SampleTable, find_file, read_csv_rows

log = logging.getLogger(__name__)

LABELS_FILE = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
_SPLITS = {"train": TRAIN, "validate": VAL, "test": TEST}


def image_id(subject: str, study: str, dicom: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom>.jpg``: an image's path relative to the root."""
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def read_mimic(cfg: DataConfig) -> SampleTable:
    """The three CSVs under ``data.root`` joined into one table with the official splits.

    Raises:
        MetadataError: a file or column missing, a label other than 1/0/-1/blank, or a split
            name other than train/validate/test (naming file and line).
    """
    if cfg.root is None:
        raise MetadataError("data.root is required for format: mimic_cxr (the mimic-cxr-jpg/"
                            "2.0.0 folder)")
    root = Path(cfg.root)
    labels_path = find_file(root, (LABELS_FILE,), "MIMIC-CXR-JPG label file")
    split_path = find_file(root, (SPLIT_FILE,), "MIMIC-CXR-JPG split file")
    meta_path = find_file(root, (METADATA_FILE,), "MIMIC-CXR-JPG metadata file")

    study_labels: dict[tuple[str, str], np.ndarray] = {}
    for k, row in enumerate(read_csv_rows(labels_path,
                                          ("subject_id", "study_id", *CHEXPERT_FINDINGS))):
        values = np.zeros(len(CHEXPERT_FINDINGS), dtype=np.float32)
        for j, name in enumerate(CHEXPERT_FINDINGS):
            try:
                values[j] = parse_chexpert_value(row[name] or "")
            except ValueError as exc:
                raise MetadataError(f"{labels_path}:{k + 2}: column {name!r}: {exc}") from None
        study_labels[(row["subject_id"].strip(), row["study_id"].strip())] = values
    view_of = {r["dicom_id"].strip(): (r["ViewPosition"] or "").strip().upper()
               for r in read_csv_rows(meta_path, ("dicom_id", "ViewPosition"))}

    rows = read_csv_rows(split_path, ("dicom_id", "study_id", "subject_id", "split"))
    n = len(rows)
    images, patients, views = [], [], []
    raw = np.zeros((n, len(CHEXPERT_FINDINGS)), dtype=np.float32)
    split = np.empty(n, dtype=np.int8)
    unlabelled = 0
    for k, row in enumerate(rows):
        subject, study, dicom = (row[c].strip() for c in ("subject_id", "study_id", "dicom_id"))
        name = row["split"].strip()
        if name not in _SPLITS:
            raise MetadataError(f"{split_path}:{k + 2}: split {name!r}; expected train, "
                                "validate or test")
        values = study_labels.get((subject, study))
        if values is None:
            unlabelled += 1
            split[k] = EXCLUDED
        else:
            raw[k] = values
            split[k] = _SPLITS[name]
        images.append(image_id(subject, study, dicom))
        patients.append(subject)
        views.append(view_of.get(dicom, ""))
    if unlabelled:
        log.warning("%d image(s) of %s belong to studies without a row in %s: left out",
                    unlabelled, split_path.name, labels_path.name)
    views_arr = np.array(views, dtype=object)
    images_arr = np.array(images, dtype=object)
    return SampleTable(
        source=split_path,
        classes=list(CHEXPERT_FINDINGS),
        images=images_arr,
        paths=np.array([root / p for p in images], dtype=object),
        labels=apply_uncertain(raw, cfg.chexpert),
        split=split,
        patients=np.array(patients, dtype=object),
        views=views_arr,
        frontal=np.isin(views_arr, ("PA", "AP")),
        # The JPG release carries no sex or age (they are in MIMIC-IV's patients table).
    )
