"""Patient-wise splits: the official lists when present, else stratified by fractions.

No patient is ever in two splits. Validation (and, without list files, test) sets are drawn by
iterative stratification over *patients* (Sechidis et al. 2011, applied to groups): patients
are visited rarest-finding first and each goes to the split that most lacks that finding, so
label frequencies match across splits as far as patient grouping allows. Deterministic for a
seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_ft.data.metadata import Metadata, MetadataError, read_image_list

TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1
SPLIT_NAMES = ("train", "val", "test")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"


def stratified_group_split(
    labels: np.ndarray, groups: np.ndarray, fractions: list[float], seed: int
) -> np.ndarray:
    """Assign each row to one of ``len(fractions)`` parts, keeping groups whole.

    Args:
        labels: ``[N, C]`` multi-hot labels (an all-zeros row counts as its own class).
        groups: ``[N]`` group ids (patients); a group never spans two parts.
        fractions: target share of rows per part (sums to 1).
        seed: tie-breaking and visiting order within equal rarity.

    Returns:
        ``[N]`` int8 part index per row.
    """
    fractions_arr = np.asarray(fractions, dtype=np.float64)
    if np.any(fractions_arr < 0) or not np.isclose(fractions_arr.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    n = len(groups)
    out = np.zeros(n, dtype=np.int8)
    if n == 0:
        return out
    cols = np.concatenate([labels, (labels.sum(1) == 0)[:, None]], axis=1).astype(np.int64)
    uniq, inverse = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(uniq), cols.shape[1]), dtype=np.int64)
    np.add.at(per_group, inverse, cols)
    size = np.bincount(inverse, minlength=len(uniq)).astype(np.float64)
    totals = cols.sum(0).astype(np.float64)

    # Rarest finding each patient has; visit rare patients first, random order among equals.
    masked = np.where(per_group > 0, totals[None, :], np.inf)
    rarest = masked.argmin(1)
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(totals[rarest[order]], kind="stable")]

    want_labels = fractions_arr[:, None] * totals[None, :]
    want_size = fractions_arr * n
    part_of_group = np.zeros(len(uniq), dtype=np.int8)
    for g in order:
        c = rarest[g]
        # Most-lacking part for this finding; ties go to the part lacking most rows.
        score = want_labels[:, c] + 1e-9 * want_size
        score = np.where(fractions_arr > 0, score, -np.inf)
        part = int(score.argmax())
        part_of_group[g] = part
        want_labels[part] -= per_group[g]
        want_size[part] -= size[g]
    out[:] = part_of_group[inverse]
    return out


def _list_rows(meta: Metadata, path: Path) -> np.ndarray:
    names = read_image_list(path)
    index = {name: i for i, name in enumerate(meta.images)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise MetadataError(
            f"{path}: {len(unknown)} image(s) not in {meta.source.name}, first {unknown[0]!r}"
        )
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


def resolve_splits(
    meta: Metadata,
    root: str | Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """The split of every metadata row: TRAIN, VAL, TEST or EXCLUDED.

    With ``test_list.txt`` in ``root`` its images are the test set (``test_fraction`` unused)
    and validation is carved patient-wise out of ``train_val_list.txt`` (or of every other
    row if that list is absent); rows in neither list are EXCLUDED. Without list files the
    split is patient-wise by ``val_fraction`` and ``test_fraction``.

    Raises:
        MetadataError: a list names an image the metadata does not have.
    """
    root = Path(root)
    split = np.full(len(meta), EXCLUDED, dtype=np.int8)
    test_path, tv_path = root / TEST_LIST, root / TRAIN_VAL_LIST
    if test_path.is_file():
        split[_list_rows(meta, test_path)] = TEST
        if tv_path.is_file():
            pool = _list_rows(meta, tv_path)
            pool = pool[split[pool] != TEST]
        else:
            pool = np.flatnonzero(split != TEST)
        parts = stratified_group_split(
            meta.labels[pool], meta.patients[pool], [1 - val_fraction, val_fraction], seed
        )
        split[pool] = np.where(parts == 1, VAL, TRAIN)
        return split
    if val_fraction + test_fraction >= 1:
        raise ValueError("data.val_fraction + data.test_fraction must be below 1")
    fractions = [1 - val_fraction - test_fraction, val_fraction, test_fraction]
    return stratified_group_split(meta.labels, meta.patients, fractions, seed)


def patient_overlap(patients: np.ndarray, split: np.ndarray) -> int:
    """Number of patients that appear in more than one split (0 for a sound split)."""
    sets = [set(patients[split == s].tolist()) for s in (TRAIN, VAL, TEST)]
    shared = (sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2])
    return len(shared)
