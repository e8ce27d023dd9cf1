"""Score image files with a trained model: a probability CSV and Grad-CAM overlays.

Images are PNG, JPEG or DICOM files (DICOM through :mod:`dist_ft.data.dicom`), decoded and
resized as the training loaders do (shorter side to the input size, centre crop), then
ImageNet-normalised.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dist_ft.console import progress
from dist_ft.data.images import load_gray_resized, load_rgb_resized
from dist_ft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalize
from dist_ft.explain.gradcam import gradcam

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
PREDICTIONS = "predictions.csv"
HEATMAPS = "heatmaps"


class ImageArgumentError(ValueError):
    """An IMAGES argument matches no image, or a list of images is malformed."""


def load_image_tensor(path: str | Path, size: int, channels: int = 1) -> torch.Tensor:
    """Decode ``path`` to a uint8 ``[channels, size, size]`` tensor, as the loaders do.

    Raises:
        dist_ft.data.images.ImageError: missing, empty or undecodable file (named).
    """
    if channels == 1:
        return torch.from_numpy(load_gray_resized(path, size)).unsqueeze(0)
    return torch.from_numpy(load_rgb_resized(path, size)).permute(2, 0, 1).contiguous()


def _from_csv(path: Path) -> list[Path]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageArgumentError(f"{path}: cannot read the image list ({exc})") from None
    if not rows or not rows[0]:
        raise ImageArgumentError(f"{path}: empty image list; expected a header with a 'path' "
                                 "column (or paths in the first column)")
    header = [c.strip() for c in rows[0]]
    column = header.index("path") if "path" in header else 0
    found = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if column >= len(row) or not row[column].strip():
            raise ImageArgumentError(f"{path}:{line}: column {header[column]!r} is empty")
        p = Path(row[column].strip()).expanduser()
        found.append(p if p.is_absolute() else path.parent / p)  # relative to the list
    return found


def collect_images(arguments: Sequence[str]) -> list[Path]:
    """Expand IMAGES arguments to image files, in order, without duplicates.

    Each argument is an image file, a folder (searched recursively for PNG, JPEG and DICOM
    files), a glob (``scans/**/*.dcm``) or a ``.csv`` list of images: its ``path`` column, or
    its first column, relative paths taken from the CSV's folder.

    Args:
        arguments: the command line's IMAGES.

    Returns:
        The image paths (files listed in a CSV are not checked here; reading names them).

    Raises:
        ImageArgumentError: an argument matches no image (named), or a CSV is malformed.
    """
    found: list[Path] = []
    for arg in arguments:
        path = Path(arg).expanduser()
        if path.is_dir():
            matched = sorted(p for p in path.rglob("*")
                             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            what = f"folder {arg}: no PNG, JPEG or DICOM file under it"
        elif path.is_file():
            matched = _from_csv(path) if path.suffix.lower() == ".csv" else [path]
            what = f"image list {arg}: no rows"
        elif glob.has_magic(arg):
            matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(arg), recursive=True)
                             if Path(p).is_file())
            what = f"glob {arg!r}: matches no file"
        else:
            raise ImageArgumentError(f"IMAGES argument {arg}: no such file or folder")
        if not matched:
            raise ImageArgumentError(f"IMAGES {what}")
        found += matched
    return list(dict.fromkeys(found))


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45,
            cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over a grayscale image.

    Args:
        gray: uint8 ``[H, W]`` image.
        heat: ``[H, W]`` map in [0, 1].
        alpha: the heatmap's weight at its maximum (weighted by the map, so cold regions
            show the image).
        cmap: a matplotlib colormap name.

    Returns:
        uint8 ``[H, W, 3]`` RGB.
    """
    from matplotlib import colormaps

    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    base = np.repeat(gray[..., None].astype(np.float64) / 255.0, 3, axis=2)
    return np.clip(np.rint((base * (1 - weight) + colour * weight) * 255), 0, 255
                   ).astype(np.uint8)


def heatmap_stems(paths: Sequence[Path]) -> list[str]:
    """File-name stems for overlays: the image's stem, ``stem~ROW`` where two images share it.

    ``ROW`` is the image's 1-based row in ``predictions.csv``.
    """
    counts = Counter(p.stem for p in paths)
    return [p.stem if counts[p.stem] == 1 else f"{p.stem}~{k + 1}" for k, p in enumerate(paths)]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def predict_images(model: nn.Module, paths: Sequence[Path], out: str | Path,
                   classes: Sequence[str], image_size: int, *, batch_size: int = 16,
                   channels: int = 1, multilabel: bool = True, heatmaps: bool = False,
                   threshold: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """Write ``out/predictions.csv`` and, with ``heatmaps``, Grad-CAM overlays.

    The CSV has a ``path`` column and one probability column per class (sigmoid for a
    multi-label model, softmax otherwise) and is written atomically. Overlays go to
    ``out/heatmaps/<stem>__<class>.png`` for every class at or above ``threshold``.

    Args:
        model: the trained classifier (eval mode), on the device it should run on.
        paths: image files.
        out: output folder (created).
        classes: the model's output names, in order.
        image_size: the model's input side.
        batch_size: images per forward pass.
        channels: 1 for grayscale models (ChestX-ray14), 3 for RGB ones.
        multilabel: sigmoid per class (True) or softmax over classes.
        heatmaps: write overlays.
        threshold: probability at or above which a class gets an overlay.
        mean, std: the input normalisation (default ImageNet's; a timm model's own from
            :func:`dist_ft.models.preprocessing.input_config`).

    Returns:
        A summary: ``images``, ``predictions`` (the CSV's path), ``heatmaps`` (count),
        ``above_threshold`` (per class, images at or above it).

    Raises:
        dist_ft.data.images.ImageError: an image is unreadable (named); the CSV is not
            written (overlays of earlier batches may be).
        ValueError: ``threshold`` outside [0, 1] or the classes do not match the model.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"--threshold must be within [0, 1], got {threshold}")
    out = Path(out)
    device = next(model.parameters()).device
    normalize = BatchNormalize(tuple(mean), tuple(std)).to(device)
    stems = heatmap_stems(paths)
    probs: list[np.ndarray] = []
    written = 0
    if heatmaps:
        (out / HEATMAPS).mkdir(parents=True, exist_ok=True)
    for start in progress(range(0, len(paths), batch_size), desc="predict", unit="batch"):
        raw = torch.stack([load_image_tensor(p, image_size, channels)
                           for p in paths[start : start + batch_size]])
        x = normalize(raw.to(device))
        with torch.no_grad():
            logits = model(x)
        if logits.shape[-1] != len(classes):
            raise ValueError(f"the model has {logits.shape[-1]} outputs but {len(classes)} "
                             f"class names were given ({', '.join(classes)})")
        p = (torch.sigmoid(logits) if multilabel else logits.softmax(-1)).float().cpu().numpy()
        probs.append(p)
        if not heatmaps:
            continue
        gray = raw.float().mean(dim=1).round().to(torch.uint8).numpy()
        for k, name in enumerate(classes):
            rows = np.flatnonzero(p[:, k] >= threshold)
            if len(rows) == 0:
                continue
            maps = gradcam(model, x[torch.from_numpy(rows).to(device)], k).cpu().numpy()
            for r, heat in zip(rows, maps, strict=True):
                buf = io.BytesIO()
                Image.fromarray(overlay(gray[r], heat), "RGB").save(buf, format="PNG")
                _write_atomic(out / HEATMAPS / f"{stems[start + r]}__{_safe(name)}.png",
                              buf.getvalue())
                written += 1
    scores = np.concatenate(probs) if probs else np.zeros((0, len(classes)))
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", *classes])
    for path, row in zip(paths, scores, strict=True):
        writer.writerow([str(path), *(f"{v:.6f}" for v in row)])
    _write_atomic(out / PREDICTIONS, text.getvalue().encode())
    return {
        "images": len(paths), "predictions": str(out / PREDICTIONS), "heatmaps": written,
        "threshold": threshold,
        "above_threshold": {c: int((scores[:, k] >= threshold).sum())
                            for k, c in enumerate(classes)},
    }
