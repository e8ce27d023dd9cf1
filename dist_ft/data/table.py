"""One row per image with everything but pixels: the common form of every labelled source.

CheXpert, MIMIC-CXR-JPG and CSV readers produce a :class:`SampleTable`; the datasets module
turns one split of it into a torch Dataset. Pure (no torch).
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from dist_ft.data.metadata import METADATA_NAMES, MetadataError

# The split folders of an ImageFolder tree (``ROOT/<split>/<class>/*``), as training finds them.
IMAGEFOLDER_SPLITS = ("train", "val", "valid", "test")


@dataclass(frozen=True)
class SampleTable:
    """Rows of a labelled image source.

    Attributes:
        source: the file the rows come from (for messages).
        classes: target names, one per label column.
        images: image ids as the source names them (relative paths or file names).
        paths: the image files.
        labels: float32 ``[N, C]``; NaN marks an entry left out of loss and metrics.
        split: int8 TRAIN/VAL/TEST/EXCLUDED per row (see ``splits.py``).
        patients: patient ids (str), or None when the source has none.
        views: ``PA``/``AP``/``LATERAL``/... (empty where unknown).
        frontal: whether the image is a frontal view.
        sexes: ``M``/``F`` (empty where unknown).
        ages: years (NaN where unknown).
    """

    source: Path
    classes: list[str]
    images: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    patients: np.ndarray | None = None
    views: np.ndarray | None = None
    frontal: np.ndarray | None = None
    sexes: np.ndarray | None = None
    ages: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: np.ndarray) -> SampleTable:
        """The rows where ``mask`` is true."""
        keep = {f.name: getattr(self, f.name)[mask] for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **keep)

    def sample_info(self) -> dict[str, np.ndarray]:
        """Per-sample metadata: ``image``, ``patient`` (the image id when unknown), and
        ``view``, ``sex``, ``age`` where the source has them."""
        images = np.asarray(self.images).astype(str)
        info = {"image": images,
                "patient": images if self.patients is None else self.patients.astype(str)}
        if self.views is not None:
            info["view"] = self.views.astype(str)
        if self.sexes is not None:
            info["sex"] = self.sexes.astype(str)
        if self.ages is not None:
            info["age"] = self.ages.astype(np.float64)
        return info


def open_text(path: Path) -> io.TextIOBase:
    """A CSV opened as text (``.gz`` decompressed), BOM stripped."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_csv_rows(path: Path, required: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """Every row of a CSV as a dict, after checking the header has ``required``.

    Raises:
        MetadataError: unreadable file, or missing columns (naming them and the header).
    """
    try:
        with open_text(path) as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise MetadataError(f"{path}: missing column {', '.join(map(repr, missing))}; "
                                    f"header is {', '.join(header) or '(empty file)'}")
            reader.fieldnames = header
            return list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise MetadataError(f"{path}: cannot read: {exc}") from None


def find_file(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` that exists in ``root`` (plain or ``.gz``).

    Raises:
        MetadataError: none exists; names the folder, the file names and ``what`` it is.
    """
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise MetadataError(f"{root}: no {what} ({' or '.join(names)}, plain or .gz); is data.root "
                        "the right folder?")


def parse_sex(text: str) -> str:
    """``Male``/``M`` -> ``M``, ``Female``/``F`` -> ``F``, anything else -> empty."""
    text = text.strip().upper()
    return text[0] if text[:1] in ("M", "F") else ""


def parse_age(text: str) -> float:
    """Years as a float; NaN for blank or unparseable text."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def detect_format(root: str | Path) -> str | None:
    """The ``data.format`` a path holds, as far as its layout tells, or None.

    A CSV file (``.csv``, ``.csv.gz``) is ``csv``; a folder with a ChestX-ray14 metadata file
    is ``chestxray14`` (checked first: a release may hold other folders); a folder with
    :data:`IMAGEFOLDER_SPLITS` subfolders is ``imagefolder``. CheXpert and MIMIC-CXR-JPG
    are not guessed (their folders also hold CSVs and class-less image trees).
    """
    root = Path(root)
    if root.is_file():
        return "csv" if root.name.lower().endswith((".csv", ".csv.gz")) else None
    if not root.is_dir():
        return None
    if any((root / name).is_file() for name in METADATA_NAMES):
        return "chestxray14"
    if any((root / name).is_dir() for name in IMAGEFOLDER_SPLITS):
        return "imagefolder"
    return None
