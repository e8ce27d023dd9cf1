"""CheXpert (Irvin et al. 2019) as Stanford distributes it.

Layout (``data.root`` is the folder holding the unpacked release)::

    ROOT/CheXpert-v1.0-small/train.csv    (or CheXpert-v1.0/ for the full-resolution release)
    ROOT/CheXpert-v1.0-small/valid.csv
    ROOT/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
    ROOT/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg

Columns ``Path,Sex,Age,Frontal/Lateral,AP/PA`` and the 14 findings of
:data:`~dist_ft.data.label_map.CHEXPERT_FINDINGS` (1.0 / 0.0 / -1.0 / blank). ``Path`` is
relative to ROOT. Splits: ``train.csv`` is split into train and val by patient
(``data.val_fraction``, ``data.split_seed``); ``valid.csv`` (the official validation set of 200
studies that papers report on) is the test split.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dist_ft.config.schema import DataConfig
from dist_ft.data.label_map import CHEXPERT_FINDINGS, apply_uncertain, parse_chexpert_value
from dist_ft.data.metadata import MetadataError
from dist_ft.data.splits import TEST, TRAIN, VAL, stratified_group_split
from dist_ft.data.table import SampleTable, parse_age, parse_sex, read_csv_rows

RELEASE_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS)
_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")


def find_release(root: str | Path) -> Path:
    """The release folder (holding ``train.csv`` and ``valid.csv``) in or at ``root``.

    Raises:
        MetadataError: no ``train.csv``/``valid.csv`` in ``root`` or its release folders.
    """
    root = Path(root)
    for folder in (*(root / d for d in RELEASE_DIRS), root):
        if (folder / "train.csv").is_file() and (folder / "valid.csv").is_file():
            return folder
    raise MetadataError(
        f"data.root: {root} has no CheXpert release; expected {RELEASE_DIRS[0]}/train.csv and "
        f"valid.csv (or {RELEASE_DIRS[1]}/...) under it"
    )


def _read(path: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    rows = read_csv_rows(path, COLUMNS)
    images, raw = [], np.zeros((len(rows), len(CHEXPERT_FINDINGS)), dtype=np.float32)
    patients, views, frontal, sexes = [], [], [], []
    ages = np.full(len(rows), np.nan)
    for k, row in enumerate(rows):
        line = k + 2
        image = row["Path"].strip()
        match = _PATIENT.search(image)
        if match is None:
            raise MetadataError(f"{path}:{line}: Path {image!r} has no patientNNNNN folder; "
                                "CheXpert paths look like train/patient00001/study1/...")
        for j, name in enumerate(CHEXPERT_FINDINGS):
            try:
                raw[k, j] = parse_chexpert_value(row[name] or "")
            except ValueError as exc:
                raise MetadataError(f"{path}:{line}: column {name!r}: {exc}") from None
        images.append(image)
        patients.append(match.group(1))
        is_frontal = (row["Frontal/Lateral"] or "").strip().lower() == "frontal"
        frontal.append(is_frontal)
        views.append((row["AP/PA"] or "").strip().upper() if is_frontal else "LATERAL")
        sexes.append(parse_sex(row["Sex"] or ""))
        ages[k] = parse_age(row["Age"] or "")
    extra = {"patients": np.array(patients, dtype=object), "views": np.array(views, dtype=object),
             "frontal": np.array(frontal, dtype=bool), "sexes": np.array(sexes, dtype=object),
             "ages": ages}
    return images, raw, extra


def read_chexpert(cfg: DataConfig) -> SampleTable:
    """Both CSVs of the release under ``data.root`` as one table with its splits.

    Uncertain labels follow ``data.chexpert`` (see :mod:`dist_ft.data.label_map`).

    Raises:
        MetadataError: no release under the root, a missing column, a value other than
            1/0/-1/blank, or a path without a patient folder (naming file and line).
    """
    if cfg.root is None:
        raise MetadataError("data.root is required for format: chexpert (the folder holding "
                            f"{RELEASE_DIRS[0]}/)")
    folder = find_release(cfg.root)
    base = folder.parent  # Path values start with the release folder's name
    parts = []
    for name in ("train.csv", "valid.csv"):
        images, raw, extra = _read(folder / name)
        parts.append((images, raw, extra))
    (tr_img, tr_raw, tr), (te_img, te_raw, te) = parts
    labels = apply_uncertain(np.concatenate([tr_raw, te_raw]), cfg.chexpert)
    train_labels = labels[: len(tr_img)]
    carve = stratified_group_split(np.nan_to_num(train_labels) > 0, tr["patients"],
                                   [1 - cfg.val_fraction, cfg.val_fraction], cfg.split_seed)
    split = np.concatenate([np.where(carve == 1, VAL, TRAIN),
                            np.full(len(te_img), TEST)]).astype(np.int8)
    images = np.array(tr_img + te_img, dtype=object)
    return SampleTable(
        source=folder / "train.csv",
        classes=list(CHEXPERT_FINDINGS),
        images=images,
        paths=np.array([base / p for p in images], dtype=object),
        labels=labels,
        split=split,
        **{k: np.concatenate([tr[k], te[k]]) for k in tr},
    )
