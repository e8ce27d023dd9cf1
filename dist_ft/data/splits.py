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

from dist_ft.config.schema import SplitFilesConfig
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


def list_files(root: str | Path | None, split_files: SplitFilesConfig | None) -> dict[str, Path]:
    """The list files that define the splits, by role (``train_val``, ``train``, ``val``,
    ``test``): ``data.split_files`` when set, else ``test_list.txt`` (and
    ``train_val_list.txt``) in ``root`` when present, else none (fractions).

    Raises:
        MetadataError: a file named in ``data.split_files`` does not exist.
    """
    if split_files is not None:
        named = {k: Path(v) for k, v in split_files.model_dump().items() if v is not None}
        for role, path in named.items():
            if not path.is_file():
                raise MetadataError(f"data.split_files.{role}: {path} is not a file; fix the "
                                    "path (relative paths are from the working directory)")
        return named
    if root is None or not (Path(root) / TEST_LIST).is_file():
        return {}
    found = {"test": Path(root) / TEST_LIST}
    if (Path(root) / TRAIN_VAL_LIST).is_file():
        found["train_val"] = Path(root) / TRAIN_VAL_LIST
    return found


def _list_rows(images: np.ndarray, index: dict[str, int], path: Path, source: str) -> np.ndarray:
    names = read_image_list(path)
    unknown = [n for n in names if n not in index]
    if unknown:
        example = f" (e.g. {str(images[0])!r})" if len(images) else ""
        raise MetadataError(
            f"{path}: {len(unknown)} image(s) not in {source}, first "
            f"{', '.join(map(repr, unknown[:3]))}; list image ids as {source} names them"
            f"{example}"
        )
    return np.unique(np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names)))


def assign_splits(
    images: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    lists: dict[str, Path] | None = None,
    source: str = "the metadata",
) -> np.ndarray:
    """The split of every row (TRAIN, VAL, TEST or EXCLUDED), from list files or fractions.

    Args:
        images: ``[N]`` image ids, as the list files name them.
        labels: ``[N, C]`` labels for stratification (NaN and -1 count as absent).
        groups: ``[N]`` patient ids; a patient never spans two carved parts.
        val_fraction, test_fraction, seed: ``data.*``; ``test_fraction`` is unused with a
            test list.
        lists: list files by role (see :func:`list_files`). With ``test`` (and ``train_val``)
            validation is carved from ``train_val`` (or every non-test row) by patient; with
            ``train`` and ``val`` the lists are taken as they are. Rows in no list are EXCLUDED.
        source: what ``images`` come from, for messages.

    Raises:
        MetadataError: a list names an image not in ``images`` (the count and the first
            few), or an image is in two lists.
    """
    positive = np.nan_to_num(np.asarray(labels, dtype=np.float32), nan=0.0) > 0
    lists = lists or {}
    if not lists:
        if val_fraction + test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        fractions = [1 - val_fraction - test_fraction, val_fraction, test_fraction]
        return stratified_group_split(positive, groups, fractions, seed)
    index = {str(name): i for i, name in enumerate(images)}
    split = np.full(len(images), EXCLUDED, dtype=np.int8)
    order = [r for r in ("train_val", "train", "val", "test") if r in lists]
    role_split = {"train": TRAIN, "val": VAL, "test": TEST, "train_val": TRAIN}
    taken = np.full(len(images), -1, dtype=np.int8)
    for k, role in enumerate(order):
        rows = _list_rows(images, index, lists[role], source)
        twice = rows[taken[rows] >= 0]
        if len(twice):
            other = lists[order[taken[twice[0]]]]
            names = ", ".join(repr(str(images[r])) for r in twice[:3])
            raise MetadataError(
                f"{lists[role]} and {other} both list {len(twice)} image(s), first {names}; "
                "an image belongs to one split: remove it from one list"
            )
        taken[rows] = k
        split[rows] = role_split[role]
    if "train" not in lists:  # carve validation by patient from train_val (or the rest)
        pool = (np.flatnonzero(split == TRAIN) if "train_val" in lists
                else np.flatnonzero(split != TEST))
        parts = stratified_group_split(positive[pool], groups[pool],
                                       [1 - val_fraction, val_fraction], seed)
        split[pool] = np.where(parts == 1, VAL, TRAIN)
    return split


def resolve_splits(
    meta: Metadata,
    root: str | Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    split_files: SplitFilesConfig | None = None,
) -> np.ndarray:
    """The split of every metadata row: TRAIN, VAL, TEST or EXCLUDED.

    With ``data.split_files``, or else ``test_list.txt`` in ``root``, the lists decide (see
    :func:`assign_splits`; validation is carved patient-wise out of ``train_val``); without
    list files the split is patient-wise by ``val_fraction`` and ``test_fraction``.

    Raises:
        MetadataError: a list file is missing, names an image the metadata does not have,
            or shares an image with another list.
    """
    return assign_splits(meta.images, meta.labels, meta.patients, val_fraction, test_fraction,
                         seed, list_files(root, split_files), meta.source.name)


def patient_overlap(patients: np.ndarray, split: np.ndarray) -> int:
    """Number of patients that appear in more than one split (0 for a sound split)."""
    sets = [set(patients[split == s].tolist()) for s in (TRAIN, VAL, TEST)]
    shared = (sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2])
    return len(shared)


def check_patient_overlap(patients: np.ndarray, split: np.ndarray, source: str) -> None:
    """Refuse splits that share a patient (their images would leak between train and test).

    Raises:
        MetadataError: naming the number of shared patients, a few ids, and the fix.
    """
    patients = np.asarray(patients).astype(str)
    sets = [set(patients[split == s].tolist()) for s in (TRAIN, VAL, TEST)]
    shared = sorted((sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2]))
    if shared:
        raise MetadataError(
            f"{source}: {len(shared)} patient(s) are in more than one split (train/val/test), "
            f"e.g. {', '.join(shared[:5])}; their images would leak between splits. Put each "
            "patient's images in one list file (data.split_files), or drop the lists and let "
            "dist-ft split by patient (data.val_fraction, data.test_fraction)"
        )
