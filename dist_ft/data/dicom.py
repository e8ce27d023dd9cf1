"""Read DICOM radiographs as 8-bit grayscale images, the way a viewer shows them.

The stored values go through the modality LUT (rescale slope/intercept), then the VOI LUT or
the window (centre/width) the file names, else a min-max stretch; MONOCHROME1 images (where
a low value is white) are inverted so bone is bright, as in ChestX-ray14's PNGs.
pydicom is imported on first use, so PNG-only work never pays for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The module, not ImageError: images imports this module at its top (an import cycle).
from dist_ft.data import images

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128  # a DICOM file: a 128-byte preamble, then b"DICM"


def has_dicom_magic(path: str | Path) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (``DICM`` after the preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by its suffix (``.dcm``, ``.dicom``) or, failing that, its magic bytes."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


def _voi_range(ds: Any) -> tuple[float, float] | None:
    """The value range pydicom's VOI step maps onto, or None when the file names no VOI.

    Mirrors :func:`pydicom.pixels.apply_windowing` (stored range through the rescale) and
    the LUT descriptor's bit depth for a VOI LUT sequence.
    """
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        bits = int(ds.BitsStored)
        low, high = ((0.0, float(2**bits - 1)) if ds.PixelRepresentation == 0
                     else (-float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)))
        if ds.get("RescaleSlope") is not None:
            slope, intercept = float(ds.RescaleSlope), float(ds.get("RescaleIntercept", 0.0))
            low, high = low * slope + intercept, high * slope + intercept
        return low, high
    return None


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low
    if span <= 0:  # a flat image: black, not a division by zero
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _pixels(ds: Any, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise images.ImageError(f"{path}: DICOM file has no pixel data (PixelData element "
                                "missing); it is not an image (a report or a structured "
                                "document?)")
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        hint = ""
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = (f" The pixel data is compressed ({name}) and no installed decoder handles "
                    "it: install pylibjpeg with pylibjpeg-libjpeg (JPEG, JPEG-LS) or "
                    "pylibjpeg-openjpeg (JPEG 2000), or python-gdcm; or decompress the file "
                    "first (gdcmconv --raw IN OUT).")
        reason = " ".join(str(exc).split())  # pydicom lists plugins on tab-indented lines
        raise images.ImageError(
            f"{path}: cannot decode DICOM pixel data ({reason}).{hint}") from None


def read_dicom(path: str | Path) -> Image.Image:
    """Decode a DICOM file to an 8-bit grayscale (mode ``L``) PIL image.

    Values go through the modality LUT (rescale slope/intercept), then the VOI LUT or the
    first window centre/width when the file has one (mapped onto 0-255 over the window), else
    a min-max stretch. MONOCHROME1 is inverted so high attenuation (bone) is bright. A
    colour image is reduced to luminance; of a multi-frame file, the first frame is used.

    Args:
        path: the ``.dcm`` file.

    Returns:
        The image, mode ``L``.

    Raises:
        dist_ft.data.images.ImageError: not a DICOM file, no pixel data, compressed without
            a decoder, or otherwise unreadable; the message names the file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise images.ImageError(f"{path}: cannot read as DICOM ({exc})") from None
    arr = _pixels(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames > 1:
        arr = arr[0]
    if samples > 1:  # RGB / YBR (pydicom converts YBR to RGB): luminance, as for PNGs
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(arr, float(arr.min()), float(arr.max()))
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L")
    try:
        values = apply_modality_lut(arr, ds)
        window = _voi_range(ds)
        if window is not None:
            values = apply_voi_lut(values, ds)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise images.ImageError(
            f"{path}: malformed DICOM rescale or window elements ({exc})") from None
    if window is None:
        window = (float(np.min(values)), float(np.max(values)))
    gray = _to_uint8(values, *window)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(np.ascontiguousarray(gray), "L")
