"""``dist-ft data stats``: counts per class and split, missing and (on request) bad images.

ChestX-ray14 folders are counted from the metadata alone (images may be absent); ImageFolder
trees, CSV files, CheXpert and MIMIC-CXR-JPG are read by the readers training uses (torch is
imported for those only).
"""

from __future__ import annotations

import csv
import typing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from dist_ft.config.errors import ConfigError
from dist_ft.config.load import apply_overrides, format_loc
from dist_ft.config.schema import DataConfig, SplitFilesConfig
from dist_ft.data.findings import FINDINGS, NO_FINDING
from dist_ft.data.images import IMAGE_FOLDERS, image_problem, locate_images
from dist_ft.data.metadata import METADATA_NAMES, MetadataError, find_metadata, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    SPLIT_NAMES,
    list_files,
    patient_overlap,
    resolve_splits,
)
from dist_ft.data.table import IMAGEFOLDER_SPLITS, detect_format, open_text

FORMATS = typing.get_args(DataConfig.model_fields["format"].annotation)  # data.format values


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    counts = {name: int(c) for name, c in zip(FINDINGS, labels.sum(0), strict=True)}
    counts[NO_FINDING] = int((labels.sum(1) == 0).sum())
    return counts


def _split_source(lists: dict[str, Path], from_recipe: bool, val_fraction: float,
                  test_fraction: float, seed: int) -> str:
    """What decided the splits, in words (the list files, or the fractions)."""
    if not lists:
        return f"patient-wise fractions (val {val_fraction}, test {test_fraction}, seed {seed})"
    if not from_recipe:  # the release's own lists, named as before
        return ", ".join(lists[role].name for role in ("train_val", "test") if role in lists)
    text = "split files: " + ", ".join(f"{role}={path}" for role, path in lists.items())
    if "train" not in lists:
        text += f" (val carved by patient: fraction {val_fraction}, seed {seed})"
    return text


def bad_images(paths: Sequence[str | Path], workers: int = 1) -> list[tuple[int, str]]:
    """``(index, reason)`` of every image in ``paths`` that does not decode as training would
    decode it (missing, empty, truncated, undecodable), in order; ``workers`` processes."""
    if workers <= 1 or len(paths) < 2:
        problems = [image_problem(p) for p in paths]
    else:
        with ProcessPoolExecutor(workers) as pool:
            problems = list(pool.map(image_problem, paths,
                                     chunksize=max(1, len(paths) // (workers * 8))))
    return [(i, reason) for i, reason in enumerate(problems) if reason is not None]


def _bad_image_keys(paths: Sequence[str | Path], names: Sequence[str], check: bool,
                    workers: int) -> dict[str, Any]:
    """The ``bad_images`` (None when not checked) and ``first_bad`` keys of the result."""
    if not check:
        return {"bad_images": None, "first_bad": []}
    bad = bad_images(paths, workers)
    return {"bad_images": len(bad),
            "first_bad": [{"image": str(names[i]), "reason": reason} for i, reason in bad[:5]]}


def chestxray14_stats(
    root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
    split_files: SplitFilesConfig | None = None, check_images: bool = False, workers: int = 1,
) -> dict[str, Any]:
    """Images, patients, findings overall and per split, missing images, patient overlap.

    The keys ``images``, ``patients``, ``labels`` (all rows, ``No Finding`` included),
    ``splits``, ``patient_overlap`` and ``missing_images`` are the documented ``--json``
    contract; the rest is detail.

    Args:
        root: the data folder.
        val_fraction, test_fraction, seed: the split settings (``data.*``).
        split_files: ``data.split_files``: list files that define the splits instead of those
            in ``root`` (see :func:`dist_ft.data.splits.assign_splits`); ``split_files`` in the
            result then names each role's file.
        check_images: also decode every image found (``bad_images``, ``first_bad``).
        workers: decoding processes for ``check_images``.

    Returns:
        The statistics; ``excluded`` counts images in no list; ``looked_in`` and
        ``image_folders`` say where images were searched and found (see
        :func:`dist_ft.data.images.locate_images`).

    Raises:
        MetadataError: no metadata, or a list file that is missing, names an unknown image or
            shares an image with another list.
    """
    root = Path(root)
    meta_path = find_metadata(root)
    meta = read_metadata(meta_path)
    split = resolve_splits(meta, root, val_fraction, test_fraction, seed, split_files)
    located = locate_images(root)
    found = located.paths
    missing = [n for n in meta.images if n not in found]
    present = [n for n in meta.images if n in found]
    lists = list_files(root, split_files)
    return {
        "format": "chestxray14",
        "root": str(root),
        "metadata": meta_path.name,
        "split_source": _split_source(lists, split_files is not None, val_fraction,
                                      test_fraction, seed),
        "split_files": {role: str(path) for role, path in lists.items()}
        if split_files is not None else None,
        "images": len(meta),
        "patients": len(np.unique(meta.patients)),
        "labels": _label_counts(meta.labels),
        "splits": {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
        "split_patients": {
            name: len(np.unique(meta.patients[split == i])) for i, name in enumerate(SPLIT_NAMES)
        },
        "split_labels": {
            name: _label_counts(meta.labels[split == i]) for i, name in enumerate(SPLIT_NAMES)
        },
        "excluded": int((split == EXCLUDED).sum()),
        "views": {v: int(c) for v, c in zip(*np.unique(meta.views, return_counts=True),
                                              strict=True)},
        "patient_overlap": patient_overlap(meta.patients, split),
        "missing_images": len(missing),
        "images_found": len(meta) - len(missing),
        "first_missing": missing[:5],
        "looked_in": list(IMAGE_FOLDERS),
        "image_folders": located.folders,
        "searched": located.looked_in(),
        **_bad_image_keys([found[n] for n in present], present, check_images, workers),
        "problems": [],
    }


def data_config(root: str | Path, fmt: str, overrides: Sequence[str] = (),
                val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                split_files: SplitFilesConfig | None = None) -> DataConfig:
    """The recipe ``data`` section that trains on ``root`` as ``fmt``, validated as a recipe's.

    ``root`` is ``data.root``, or ``data.csv.file`` for ``csv``; ``overrides`` are further
    ``KEY=VALUE`` items under ``data`` (``csv.label_column=Finding Labels``; a leading
    ``data.`` is accepted).

    Raises:
        ConfigError: a malformed override or a value the schema refuses, naming the key.
    """
    section: dict[str, Any] = {"format": fmt, "val_fraction": val_fraction,
                               "test_fraction": test_fraction, "split_seed": seed}
    if fmt == "csv":
        section["csv"] = {"file": str(Path(root).absolute())}
    else:
        section["root"] = str(Path(root).absolute())
    if split_files is not None:
        section["split_files"] = split_files.model_dump(exclude_none=True)
    items = [o.removeprefix("data.") for o in overrides]
    problems = apply_overrides(section, items)
    if problems:
        raise ConfigError([f"--data {p.removeprefix('override ')}" for p in problems])
    try:
        return DataConfig.model_validate(section)
    except ValidationError as exc:
        problems = [f"data.{format_loc(e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                    + (" (set it with --data KEY=VALUE)" if e["type"] == "missing" else "")
                    for e in exc.errors()]
        if fmt == "csv" and any(tuple(e["loc"]) == ("csv",) for e in exc.errors()):
            problems.append(f"name the labels of {root}: --data csv.label_column=COLUMN (names "
                            "joined by |) or --data 'csv.label_columns=[A, B]' (0/1 columns); "
                            f"its header is {_csv_header(Path(root))}")
        raise ConfigError(problems) from None


def _csv_header(path: Path) -> str:
    """The column names of a CSV file, for a message (the error text if unreadable)."""
    try:
        with open_text(path) as fh:
            return ", ".join(next(csv.reader(fh), [])) or "(empty)"
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        return f"unreadable ({exc})"


def _unknown_layout(root: Path) -> MetadataError:
    return MetadataError(
        f"{root}: not a dataset layout dist-ft recognises: no ChestX-ray14 metadata file "
        f"({', '.join(METADATA_NAMES)}), no ImageFolder split folder "
        f"({', '.join(n + '/' for n in IMAGEFOLDER_SPLITS)}), and not a .csv file; give the "
        f"folder or CSV file a recipe's data.root or data.csv.file names, or --format "
        f"({', '.join(FORMATS)})"
    )


def dataset_stats(
    root: str | Path, fmt: str = "auto", overrides: Sequence[str] = (),
    val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
    split_files: SplitFilesConfig | None = None, check_images: bool = False, workers: int = 1,
) -> dict[str, Any]:
    """``dist-ft data stats`` for any format; the keys of :func:`chestxray14_stats`.

    Args:
        root: a ChestX-ray14 folder, an ImageFolder tree (``train/``, ``val/``, ``test/``),
            a CSV file, or a CheXpert/MIMIC-CXR-JPG folder.
        fmt: a ``data.format``, or ``auto`` to tell it from the layout (CheXpert and
            MIMIC-CXR-JPG must be named).
        overrides: ``KEY=VALUE`` items under ``data`` (see :func:`data_config`); only for
            formats other than ChestX-ray14.
        val_fraction, test_fraction, seed, split_files: the split settings (``data.*``).
        check_images: also decode every image (``bad_images``, ``first_bad``).
        workers: decoding processes for ``check_images``.

    Raises:
        MetadataError: an unrecognised layout, bad metadata or CSV (naming file, line,
            column), an ImageFolder split folder without images.
        ConfigError: an override or setting the recipe schema refuses.
    """
    root = Path(root)
    if fmt == "auto":
        if not root.exists():
            raise MetadataError(f"{root}: no such file or folder")
        detected = detect_format(root)
        if detected is None:
            raise _unknown_layout(root)
        fmt = detected
    if fmt == "chestxray14":
        if overrides:
            raise ConfigError([f"--data {overrides[0]}: ChestX-ray14 folders take no data "
                               "settings beyond the split flags"])
        return chestxray14_stats(root, val_fraction, test_fraction, seed, split_files,
                                 check_images, workers)
    cfg = data_config(root, fmt, overrides, val_fraction, test_fraction, seed, split_files)
    doc = _imagefolder_stats(cfg) if fmt == "imagefolder" else _table_stats(cfg)
    paths, names = doc.pop("_paths"), doc.pop("_names")
    doc.update(_bad_image_keys(paths, names, check_images, workers))
    return doc


def _imagefolder_stats(cfg: DataConfig) -> dict[str, Any]:
    """Per-split class counts of an ImageFolder tree, through training's dataset builder."""
    from dist_ft.data.datasets import split_datasets

    assert cfg.root is not None  # set by data_config
    root = Path(cfg.root)
    if not root.is_dir():
        raise MetadataError(f"{root}: not a folder (an ImageFolder tree has train/, val/ and "
                            "test/ folders of class folders)")
    sets, problems = split_datasets(cfg)
    classes = list(sets["train"].classes)
    split_labels = {}
    for split, ds in sets.items():
        counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
        split_labels[split] = {c: int(n) for c, n in zip(ds.classes, counts, strict=True)}
    labels = {c: sum(s.get(c, 0) for s in split_labels.values())
              for c in dict.fromkeys(c for s in split_labels.values() for c in s)}
    paths = [str(p) for ds in sets.values() for p in ds.paths]
    names = [str(n) for split, ds in sets.items()
             for n in (f"{split}/{i}" for i in ds.sample_info["image"])]
    return {
        "format": "imagefolder", "root": str(root),
        "split_source": "folders " + ", ".join(
            f"{n}/" for n in IMAGEFOLDER_SPLITS if (root / n).is_dir()),
        "classes": classes, "multilabel": False,
        "images": len(paths), "patients": None,
        "labels": labels,
        "splits": {split: len(sets[split]) if split in sets else 0 for split in SPLIT_NAMES},
        "split_labels": split_labels, "split_patients": None, "patient_overlap": None,
        "missing_images": 0, "images_found": len(paths), "first_missing": [],
        "problems": problems, "_paths": paths, "_names": names,
    }


def _table_stats(cfg: DataConfig) -> dict[str, Any]:
    """Counts of a CSV, CheXpert or MIMIC-CXR-JPG source, through training's table reader."""
    from dist_ft.data.datasets import read_table

    table = read_table(cfg)
    labels = np.nan_to_num(np.asarray(table.labels, dtype=np.float64))  # NaN: uncertain
    exists = np.fromiter((Path(p).is_file() for p in table.paths), dtype=bool,
                         count=len(table))
    patients = None if table.patients is None else np.asarray(table.patients).astype(str)
    split = table.split
    images_root = Path(cfg.root) if cfg.root else Path(table.source).parent
    return {
        "format": cfg.format, "root": str(images_root), "source": str(table.source),
        "split_source": _table_split_source(cfg),
        "classes": list(table.classes), "multilabel": True,
        "images": len(table),
        "patients": None if patients is None else len(np.unique(patients)),
        "labels": {c: int(n) for c, n in zip(table.classes, labels.sum(0), strict=True)},
        "splits": {name: int((split == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
        "split_labels": {
            name: {c: int(n) for c, n in zip(table.classes, labels[split == i].sum(0),
                                             strict=True)}
            for i, name in enumerate(SPLIT_NAMES)
        },
        "split_patients": None if patients is None else {
            name: len(np.unique(patients[split == i])) for i, name in enumerate(SPLIT_NAMES)
        },
        "patient_overlap": None if patients is None else patient_overlap(patients, split),
        "excluded": int((split == EXCLUDED).sum()),
        "missing_images": int((~exists).sum()),
        "images_found": int(exists.sum()),
        "first_missing": [str(n) for n in table.images[~exists][:5]],
        "searched": f"image paths of {table.source} taken relative to {images_root}",
        "problems": [],
        "_paths": [str(p) for p in table.paths[exists]],
        "_names": [str(n) for n in table.images[exists]],
    }


def _table_split_source(cfg: DataConfig) -> str:
    """What decided a table's splits, in words."""
    if cfg.format != "csv":
        return f"the official {cfg.format} splits"
    assert cfg.csv is not None  # guaranteed by DataConfig
    if cfg.csv.split_column:
        return f"column {cfg.csv.split_column!r}"
    by = "patient" if cfg.csv.patient_column else "image"
    if cfg.split_files is not None:
        lists = {k: v for k, v in cfg.split_files.model_dump().items() if v}
        return "split files: " + ", ".join(f"{k}={v}" for k, v in lists.items())
    return (f"random by {by} (val {cfg.val_fraction}, test {cfg.test_fraction}, "
            f"seed {cfg.split_seed})")
