"""Find and decode images: ChestX-ray14 folder layouts, any PNG/JPEG mode, DICOM, clear errors."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The module, not its names: dicom imports ImageError from here, so whichever of the two is
# imported first, the other's attributes are looked up at call time. (pydicom itself loads
# on the first DICOM read.)
from dist_ft.data import dicom


class ImageError(ValueError):
    """An image is missing, empty, truncated, not decodable or over PIL's decompression-bomb
    pixel limit; the message names the file."""


# Where the PNGs of a ChestX-ray14 folder may lie, relative to it, in order of precedence:
# the rule has this one owner; every message about missing images quotes it.
IMAGE_FOLDERS = ("images/", "images_*/images/", "images_*/", "./")


@dataclass(frozen=True)
class ImageLocations:
    """The PNGs found under a ChestX-ray14 folder and the folders searched for them.

    Attributes:
        root: the data folder.
        paths: image file name -> path (a name found twice keeps its first location).
        folders: every folder searched that exists, relative to ``root`` (``.`` for the root
            itself), with the number of PNGs in it.
    """

    root: Path
    paths: dict[str, Path]
    folders: dict[str, int]

    def looked_in(self) -> str:
        """Where images were looked for and found, for messages about missing images."""
        found = [f"{name}/ ({count:,} PNGs)" for name, count in self.folders.items() if count]
        return (f"looked in {', '.join(IMAGE_FOLDERS)} under {self.root}; "
                + (f"found PNGs in {', '.join(found)}" if found else "found no PNG there"))


def locate_images(root: str | Path) -> ImageLocations:
    """Find every PNG of a ChestX-ray14 folder as the release unpacks, or beside the metadata.

    Looks in :data:`IMAGE_FOLDERS`: ``root/images/``, ``root/images_*/images/`` (one folder
    per tarball), ``root/images_*/`` directly, then ``root`` itself (a few PNGs copied next to
    ``Data_Entry_2017.csv``).
    """
    root = Path(root)
    folders = [root / "images"]
    if root.is_dir():
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir() and entry.name.startswith("images_"):
                folders += [Path(entry.path) / "images", Path(entry.path)]
        folders.append(root)
    found: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        count = 0
        for entry in os.scandir(folder):
            if entry.name.endswith(".png") and entry.is_file():
                found.setdefault(entry.name, Path(entry.path))
                count += 1
        counts[folder.relative_to(root).as_posix()] = count
    return ImageLocations(root, found, counts)


def find_images(root: str | Path) -> dict[str, Path]:
    """Map image file name -> path for every PNG of ``root`` (see :func:`locate_images`)."""
    return locate_images(root).paths


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be trained on (missing, empty, truncated, undecodable), or None.

    Decodes the whole image, as training does: a truncated PNG passes a header check.
    """
    try:
        _open(Path(path))
    except ImageError as exc:
        return str(exc)
    return None


def _open(path: Path) -> Image.Image:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: image file is missing") from None
    if size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    # DICOM by suffix here; by its magic bytes only once PIL gives up (no extra read per PNG).
    if path.suffix.lower() in dicom.DICOM_SUFFIXES:
        return dicom.read_dicom(path)
    try:
        # PIL only warns between 1x and 2x its pixel limit and raises an Exception subclass
        # above; both become one ImageError, so on_bad_image=skip treats a bomb like any bad
        # file. (The filter is process-wide: images are decoded in processes, not threads.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here, named
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{path}: not decoded, too many pixels for PIL (Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}): {exc} Replace the file, or skip bad images "
            "(data.on_bad_image=skip; dist-ft data prepare --on-bad-image skip)"
        ) from None
    except UnidentifiedImageError as exc:
        if dicom.has_dicom_magic(path):
            return dicom.read_dicom(path)
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    return img


def to_gray(img: Image.Image) -> Image.Image:
    """One 8-bit channel from any mode: L as is, RGB(A)/P via luminance, 16-bit rescaled."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA").convert("RGB")  # alpha is 255 in the release; drop it
    return img.convert("L")


def load_gray(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W]`` array (one channel).

    Raises:
        ImageError: missing, empty, truncated or undecodable file.
    """
    return np.asarray(to_gray(_open(Path(path))))


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a uint8 ``[H, W, 3]`` array.

    Raises:
        ImageError: missing, empty, truncated or undecodable file.
    """
    return np.asarray(_open(Path(path)).convert("RGB"))


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased), then centre-crop a square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        # BILINEAR in PIL filters over the whole footprint when shrinking (antialiased);
        # reducing_gap first box-reduces by an integer factor, much faster at 4x and more.
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size)) if (nw, nh) != (size, size) else img


def load_gray_resized(path: str | Path, size: int) -> np.ndarray:
    """Decode, convert to one channel and resize to a ``size`` x ``size`` uint8 array."""
    return np.array(resize_square(to_gray(_open(Path(path))), size))  # writable, for torch


def load_rgb_resized(path: str | Path, size: int) -> np.ndarray:
    """Decode to RGB and resize to a ``size`` x ``size`` x 3 uint8 array."""
    return np.array(resize_square(_open(Path(path)).convert("RGB"), size))
