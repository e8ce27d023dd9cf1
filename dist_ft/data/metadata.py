"""Read ChestX-ray14 metadata as users have it on disk: ``Data_Entry_2017*.csv[.gz]``.

Handles both dialects: the 2017 original (CRLF line ends, a trailing comma on every line,
zero-padded ``Follow-up #`` and ``Patient ID``, ages such as ``058Y``/``011M``/``004D``) and
the 2020 revision (integer ages and ids, no trailing comma), and the ``Patient Gender`` /
``Patient Sex`` header variants. Errors name the file, line and item.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_ft.data.findings import FINDINGS, UnknownFindingError, encode_findings

# Preferred first: the 2020 revision corrects the labels of 181 images.
METADATA_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
_SEX = ("Patient Gender", "Patient Sex")
_MAX_PATIENT_ID = int(np.iinfo(np.int64).max)


class MetadataError(ValueError):
    """The metadata file is missing, malformed or inconsistent; the message names the item."""


@dataclass(frozen=True)
class Metadata:
    """One row per image, in file order.

    Attributes:
        source: the file read.
        images: image file names (``00000001_000.png``).
        labels: uint8 ``[N, 14]`` multi-hot, columns in :data:`FINDINGS` order.
        patients: int64 patient ids.
        views: ``PA``/``AP``/... (empty string where the column is absent).
        ages: age in years (float; NaN where absent or unparseable).
        sexes: ``M``/``F`` (empty where absent).
    """

    source: Path
    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    views: np.ndarray
    ages: np.ndarray
    sexes: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: np.ndarray) -> Metadata:
        """The rows where ``mask`` is true (or at the given indices)."""
        return Metadata(
            self.source, self.images[mask], self.labels[mask], self.patients[mask],
            self.views[mask], self.ages[mask], self.sexes[mask],
        )


def find_metadata(root: str | Path) -> Path:
    """The metadata file in ``root``: the 2020 revision if present, else the 2017 original.

    Raises:
        MetadataError: none of the known file names exists in ``root``.
    """
    root = Path(root)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise MetadataError(
        f"{root}: no ChestX-ray14 metadata file; expected one of {', '.join(METADATA_NAMES)}"
    )


def _parse_age(text: str) -> float:
    text = text.strip()
    if not text:
        return float("nan")
    unit = text[-1].upper()
    if unit in "YMD":
        try:
            value = int(text[:-1])
        except ValueError:
            return float("nan")
        return value / {"Y": 1, "M": 12, "D": 365}[unit]
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_metadata(path: str | Path) -> Metadata:
    """Read a ``Data_Entry_2017*.csv`` file (plain or ``.gz``, either dialect).

    Raises:
        MetadataError: unreadable file, a required column missing, a malformed or out-of-range
            patient id, an unknown finding or a duplicated image index; the message names
            file, line and item.
    """
    path = Path(path)
    try:
        with _open_text(path) as fh:
            rows = list(csv.reader(fh))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise MetadataError(f"{path}: cannot read metadata: {exc}") from None
    if not rows:
        raise MetadataError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    while header and header[-1] == "":
        header.pop()  # the 2017 file's trailing comma
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise MetadataError(
            f"{path}: missing column {', '.join(repr(c) for c in missing)}; "
            f"header is {', '.join(header)}"
        )
    col = {name: i for i, name in enumerate(header)}
    i_img, i_lab, i_pat = (col[c] for c in REQUIRED)
    i_view = col.get("View Position")
    i_age = col.get("Patient Age")
    i_sex = next((col[c] for c in _SEX if c in col), None)

    n = len(rows) - 1
    images: list[str] = []
    labels = np.zeros((n, len(FINDINGS)), dtype=np.uint8)
    patients = np.zeros(n, dtype=np.int64)
    views, sexes = [""] * n, [""] * n
    ages = np.full(n, np.nan)
    seen: dict[str, int] = {}
    width = max(i_img, i_lab, i_pat) + 1
    for k, row in enumerate(rows[1:]):
        line = k + 2
        if len(row) < width:
            if not any(cell.strip() for cell in row):
                raise MetadataError(f"{path}:{line}: empty line inside the table")
            raise MetadataError(
                f"{path}:{line}: {len(row)} fields, expected {len(header)} ({row[:1]})"
            )
        image = row[i_img].strip()
        if image in seen:
            raise MetadataError(
                f"{path}:{line}: duplicated image index {image!r} (first at line {seen[image]})"
            )
        seen[image] = line
        images.append(image)
        try:
            labels[k] = encode_findings(row[i_lab])
        except UnknownFindingError as exc:
            raise MetadataError(f"{path}:{line}: {image}: {exc}") from None
        try:
            patient = int(row[i_pat])
        except ValueError:
            raise MetadataError(
                f"{path}:{line}: {image}: Patient ID {row[i_pat]!r} is not an integer"
            ) from None
        # Ids are stored as int64 (the release's run 1..30805); a wider one would overflow.
        if not 0 <= patient <= _MAX_PATIENT_ID:
            raise MetadataError(
                f"{path}:{line}: {image}: Patient ID {row[i_pat].strip()!r} is out of range: "
                f"ids are whole numbers from 0 to {_MAX_PATIENT_ID} (the release's run from 1 to "
                "30805); correct that row"
            )
        patients[k] = patient
        if i_view is not None and i_view < len(row):
            views[k] = row[i_view].strip()
        if i_age is not None and i_age < len(row):
            ages[k] = _parse_age(row[i_age])
        if i_sex is not None and i_sex < len(row):
            sexes[k] = row[i_sex].strip()
    return Metadata(
        source=path,
        images=np.array(images, dtype=object),
        labels=labels,
        patients=patients,
        views=np.array(views, dtype=object),
        ages=ages,
        sexes=np.array(sexes, dtype=object),
    )


def read_image_list(path: str | Path) -> list[str]:
    """Read ``train_val_list.txt`` / ``test_list.txt``: one image name per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
