"""``dist-ft data stats``: counts from metadata alone (images may be absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.data.findings import FINDINGS, NO_FINDING
from dist_ft.data.images import find_images
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    SPLIT_NAMES,
    TEST_LIST,
    TRAIN_VAL_LIST,
    patient_overlap,
    resolve_splits,
)


def _label_counts(labels: np.ndarray) -> dict[str, int]:
    counts = {name: int(c) for name, c in zip(FINDINGS, labels.sum(0), strict=True)}
    counts[NO_FINDING] = int((labels.sum(1) == 0).sum())
    return counts


def chestxray14_stats(
    root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, Any]:
    """Images, patients, findings overall and per split, missing images, patient overlap.

    The keys ``images``, ``patients``, ``labels`` (all rows, ``No Finding`` included),
    ``splits``, ``patient_overlap`` and ``missing_images`` are the documented ``--json``
    contract; the rest is detail.
    """
    root = Path(root)
    meta_path = find_metadata(root)
    meta = read_metadata(meta_path)
    split = resolve_splits(meta, root, val_fraction, test_fraction, seed)
    found = find_images(root)
    missing = [n for n in meta.images if n not in found]
    lists = [n for n in (TRAIN_VAL_LIST, TEST_LIST) if (root / n).is_file()]
    return {
        "root": str(root),
        "metadata": meta_path.name,
        "split_source": ", ".join(lists) if lists else
        f"patient-wise fractions (val {val_fraction}, test {test_fraction}, seed {seed})",
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
