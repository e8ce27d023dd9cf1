"""``dist-ft data stats``: counts from metadata alone (images may be absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.config.schema import SplitFilesConfig
from dist_ft.data.findings import FINDINGS, NO_FINDING
from dist_ft.data.images import find_images
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    SPLIT_NAMES,
    list_files,
    patient_overlap,
    resolve_splits,
)


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


def chestxray14_stats(
    root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
    split_files: SplitFilesConfig | None = None,
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

    Returns:
        The statistics; ``excluded`` counts images in no list.

    Raises:
        MetadataError: no metadata, or a list file that is missing, names an unknown image or
            shares an image with another list.
    """
    root = Path(root)
    meta_path = find_metadata(root)
    meta = read_metadata(meta_path)
    split = resolve_splits(meta, root, val_fraction, test_fraction, seed, split_files)
    found = find_images(root)
    missing = [n for n in meta.images if n not in found]
    lists = list_files(root, split_files)
    return {
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
    }
