"""Score Grad-CAM heatmaps against ChestX-ray14's ``BBox_List_2017.csv``.

Two scores per box, as in the weakly-supervised localization literature:

- **pointing game**: a hit when the heatmap's maximum lies inside the box, or within
  ``tolerance_px`` of it (Zhang et al. 2016, "Top-down neural attention by excitation
  backprop", allow 15 px at the original resolution; the default here is 0, strict);
- **IoU**: of the heatmap thresholded at ``threshold`` x its maximum with the box.

Per finding: the hit rate with a 95% Wilson interval (boxes as independent trials) and the
mean IoU with a 95% percentile bootstrap interval resampled by image (seeded).
Boxes are given in the original image's pixels (1024 px for the release) and are mapped to
the heatmap by the same shorter-side resize and centre crop the loaders apply.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import ImageError
from dist_ft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalize
from dist_ft.evaluation.bootstrap import confidence_interval, patient_bootstrap
from dist_ft.explain.gradcam import MapSpec, gradcam, map_spec, model_device_dtype
from dist_ft.explain.predict import load_image_tensor

# The box file spells one finding differently from Data_Entry_2017.csv.
LABEL_ALIASES = {"Infiltrate": "Infiltration"}
HEADER_START = ("Image Index", "Finding Label")


class BoxFileError(ValueError):
    """A bounding-box list is unreadable or a row is malformed; the message names the row."""


@dataclass(frozen=True)
class Box:
    """One bounding box: image file name, finding (dist-ft's spelling), x, y, w, h in pixels."""

    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float


def read_bbox_csv(path: str | Path, findings: Sequence[str] = FINDINGS) -> list[Box]:
    """Read ``BBox_List_2017.csv`` (the release's or the synthetic twin's).

    The header starts ``Image Index,Finding Label`` (the release's has
    ``Bbox [x,y,w,h],,,`` after it); each row is an image name, a finding (``Infiltrate`` is
    read as ``Infiltration``) and four numbers; trailing empty cells are ignored.

    Args:
        path: the CSV file.
        findings: the finding names a label must be one of (after the alias).

    Returns:
        The boxes, in file order.

    Raises:
        BoxFileError: unreadable file, another header, or a row with a missing or
            non-numeric coordinate, a non-positive size or an unknown finding (named by line
            and column).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise BoxFileError(f"{path}: cannot read the box list ({exc})") from None
    if not rows or tuple(c.strip() for c in rows[0][:2]) != HEADER_START:
        found = ",".join(rows[0][:3]) if rows else "an empty file"
        raise BoxFileError(f"{path}:1: expected a header starting 'Image Index,Finding Label' "
                           f"(as BBox_List_2017.csv), found {found!r}")
    known = set(findings)
    boxes = []
    for line, row in enumerate(rows[1:], start=2):
        cells = list(row)
        while cells and not cells[-1].strip():
            cells.pop()
        if not cells:
            continue  # a blank line
        if len(cells) != 6:
            raise BoxFileError(f"{path}:{line}: expected 6 cells (image, finding, x, y, w, h), "
                               f"found {len(cells)}: {','.join(row)!r}")
        image, label = cells[0].strip(), cells[1].strip()
        finding = LABEL_ALIASES.get(label, label)
        if finding not in known:
            raise BoxFileError(f"{path}:{line}: column 'Finding Label': unknown finding "
                               f"{label!r}; expected one of {', '.join(sorted(known))}")
        values = []
        for name, cell in zip(("x", "y", "w", "h"), cells[2:], strict=True):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise BoxFileError(f"{path}:{line}: column '{name}' of Bbox [x,y,w,h]: "
                                   f"{cell!r} is not a finite number")
            values.append(value)
        if values[2] <= 0 or values[3] <= 0:
            raise BoxFileError(f"{path}:{line}: box of {image} has width {values[2]} and height "
                               f"{values[3]}; both must be positive")
        boxes.append(Box(image, finding, *values))
    return boxes


def scale_box(box: Box, image_w: int, image_h: int, size: int) -> tuple[float, float, float,
                                                                       float]:
    """Map a box from original pixels to a ``size`` square heatmap.

    Same geometry as :func:`dist_ft.data.images.resize_square`: the shorter side scaled to
    ``size``, then a centred square crop; the result is clipped to the square.

    Args:
        box: in the pixels of an ``image_w`` x ``image_h`` image.
        image_w: width of the image the box coordinates refer to.
        image_h: height of that image.
        size: side of the heatmap.

    Returns:
        ``(x0, y0, x1, y1)`` in heatmap pixels (floats; ``x1``/``y1`` exclusive).
    """
    scale = size / min(image_w, image_h)
    left = (max(size, round(image_w * scale)) - size) // 2
    top = (max(size, round(image_h * scale)) - size) // 2
    x0, y0 = box.x * scale - left, box.y * scale - top
    x1, y1 = x0 + box.w * scale, y0 + box.h * scale
    return (min(max(x0, 0.0), size), min(max(y0, 0.0), size),
            min(max(x1, 0.0), size), min(max(y1, 0.0), size))


def box_scores(heatmap: np.ndarray, corners: tuple[float, float, float, float],
               threshold: float = 0.5, tolerance: float = 0.0) -> tuple[bool, float]:
    """Pointing-game hit and IoU of one ``[H, W]`` heatmap with one box.

    Args:
        heatmap: non-negative map (any scale).
        corners: ``(x0, y0, x1, y1)`` in heatmap pixels, as :func:`scale_box` returns.
        threshold: share of the map's maximum at or above which a pixel is "on".
        tolerance: heatmap pixels the argmax may lie outside the box and still hit (its
            centre within this distance of the box).

    Returns:
        ``(hit, iou)``: whether the argmax pixel's centre is in the box (or within
        ``tolerance``), and the IoU of the
        on pixels with the pixels whose centres are in the box (0 for an all-zero map).
    """
    h, w = heatmap.shape
    x0, y0, x1, y1 = corners
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    top = float(heatmap.max())
    if top <= 0:
        return False, 0.0
    py, px = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    # Distance from the argmax pixel's centre to the box (0 inside; x1/y1 are exclusive).
    dx = max(x0 - (px + 0.5), (px + 0.5) - x1, 0.0)
    dy = max(y0 - (py + 0.5), (py + 0.5) - y1, 0.0)
    hit = bool(inside[py, px]) or (tolerance > 0 and math.hypot(dx, dy) <= tolerance)
    on = heatmap >= threshold * top
    union = np.count_nonzero(on | inside)
    return hit, float(np.count_nonzero(on & inside) / union) if union else 0.0


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``nan`` bounds for ``n == 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_by_group(values: np.ndarray, groups: np.ndarray, resamples: int = 1000,
                            seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``values.mean()``, resampling whole groups.

    The cluster bootstrap of :mod:`dist_ft.evaluation.bootstrap` (groups as patients).

    Args:
        values: one value per box.
        groups: the group (image) of each value; groups are drawn with replacement.
        resamples: number of bootstrap draws.
        seed: the draw's seed.

    Returns:
        ``(low, high)``; ``nan`` bounds when there are no values.
    """
    if len(values) == 0:
        return math.nan, math.nan
    weights = patient_bootstrap(np.asarray(groups), resamples, seed)  # [R, N] multiplicities
    means = weights @ np.asarray(values, dtype=np.float64) / weights.sum(axis=1)
    return confidence_interval(means, alpha=0.05)


def heatmaps_for(model: nn.Module, paths: Sequence[Path], class_index: int, image_size: int,
                 batch_size: int = 16, channels: int = 1,
                 layer: nn.Module | str | None = None, *,
                 spec: MapSpec | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Grad-CAM maps ``[N, image_size, image_size]`` of one class for image files.

    Images are decoded, resized as the loaders do (shorter side, centre crop) and normalised
    with ``mean``/``std`` (the model's, ``models.preprocessing.input_config``); the model
    runs on the device and in the dtype of its parameters.

    Args:
        model: the classifier (eval mode).
        paths: the image files.
        class_index: the output to explain.
        image_size: the model's input side.
        batch_size: images per Grad-CAM batch.
        channels: channels decoded from each file (1 grayscale, 3 RGB); the model gets 3.
        layer: Grad-CAM's layer (default: the family's).
        spec: :func:`dist_ft.explain.gradcam.map_spec` of this model and layer at
            ``image_size``; computed once here when not given (pass it across calls).

    Returns:
        float32 maps in [0, 1], in the order of ``paths``.

    Raises:
        dist_ft.data.images.ImageError: an image is unreadable (named).
    """
    device, dtype = model_device_dtype(model)
    if spec is None:
        spec = map_spec(model, image_size, 3, layer)
    normalize = BatchNormalize(tuple(mean), tuple(std)).to(device)
    out = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([load_image_tensor(p, image_size, channels)
                             for p in paths[start : start + batch_size]]).to(device)
        images = normalize(batch).to(dtype)  # BatchNormalize yields float32
        out.append(gradcam(model, images, class_index, layer, spec=spec).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, image_size, image_size), np.float32)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    from dist_ft.data.dicom import is_dicom

    if is_dicom(path):
        from dist_ft.data.dicom import read_dicom

        return read_dicom(path).size
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the image size ({exc})") from None


def localization_report(model: nn.Module, image_size: int, image_paths: Mapping[str, Path],
                        boxes: Sequence[Box], classes: Sequence[str], batch_size: int = 16,
                        threshold: float = 0.5, channels: int = 1,
                        box_image_size: int | None = None, resamples: int = 1000,
                        seed: int = 0, layer: nn.Module | str | None = None,
                        tolerance_px: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD) -> dict[str, Any]:
    """Pointing game and IoU of the model's Grad-CAM maps with every box of a box list.

    Args:
        model: the trained classifier (eval mode).
        image_size: the model's input side (``recipe.data.image_size``).
        image_paths: image file name (as in the box list) -> path; boxes of other images are
            skipped and counted.
        boxes: from :func:`read_bbox_csv`.
        classes: the model's output names, in order; boxes of a finding not among them are
            skipped and counted.
        batch_size: images per Grad-CAM batch.
        threshold: share of each map's maximum for the IoU mask.
        channels: 1 for grayscale models (ChestX-ray14), 3 for RGB ones.
        box_image_size: the square side the box coordinates refer to when it is not the image
            file's own size (e.g. 1024 for the release's boxes with downscaled PNGs).
        resamples: bootstrap draws for the IoU interval.
        seed: the bootstrap's seed.
        layer: Grad-CAM's layer (default: the family's, see
            :func:`dist_ft.explain.gradcam.default_layer`).
        tolerance_px: pointing-game tolerance in the box list's pixels (scaled with the box):
            a maximum this close to the box still hits. 0 (default) is strict; the
            literature's 15 px (Zhang et al. 2016) is about 1.5% of a 1024 px radiograph.
        mean, std: the input normalisation (default ImageNet's; a timm model's own from
            :func:`dist_ft.models.preprocessing.input_config`).

    Returns:
        JSON-able dict: ``findings`` (per finding: boxes, images, hits, hit_rate, hit_rate_ci,
        mean_iou, mean_iou_ci), ``overall`` (the same over all boxes), ``threshold``,
        ``tolerance_px``,
        ``skipped`` (boxes without an image, of another finding).

    Raises:
        ValueError: ``threshold`` outside (0, 1], or no box can be scored.
        dist_ft.data.images.ImageError: an image is unreadable (named).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not (math.isfinite(tolerance_px) and tolerance_px >= 0):
        raise ValueError(f"tolerance_px must be a finite number >= 0, got {tolerance_px}")
    index = {name: k for k, name in enumerate(classes)}
    no_image = [b for b in boxes if b.image not in image_paths]
    other = [b for b in boxes if b.image in image_paths and b.finding not in index]
    usable = [b for b in boxes if b.image in image_paths and b.finding in index]
    if not usable:
        raise ValueError(
            f"none of the {len(boxes)} boxes can be scored: {len(no_image)} are of images not "
            f"among the {len(image_paths)} given, {len(other)} of findings not among the "
            f"model's classes ({', '.join(classes)})")
    # One probe forward for the whole report: class count, cell centres and resolution.
    spec = map_spec(model, image_size, 3, layer)  # normalized input: 3 channels
    sizes: dict[str, tuple[int, int]] = {}
    per_box: list[tuple[Box, bool, float]] = []
    box_sides: list[float] = []  # the shorter side of each box, in heatmap pixels
    for finding in dict.fromkeys(b.finding for b in usable):
        of_finding = [b for b in usable if b.finding == finding]
        names = list(dict.fromkeys(b.image for b in of_finding))
        maps = heatmaps_for(model, [Path(image_paths[n]) for n in names], index[finding],
                            image_size, batch_size, channels, layer, spec=spec, mean=mean,
                            std=std)
        by_name = dict(zip(names, maps, strict=True))
        for box in of_finding:
            if box_image_size is not None:
                w = h = box_image_size
            else:
                if box.image not in sizes:
                    sizes[box.image] = _image_size(Path(image_paths[box.image]))
                w, h = sizes[box.image]
            corners = scale_box(box, w, h, image_size)
            box_sides.append(min(corners[2] - corners[0], corners[3] - corners[1]))
            hit, iou = box_scores(by_name[box.image], corners,
                                  threshold, tolerance_px * image_size / min(w, h))
            per_box.append((box, hit, iou))

    def summary(items: list[tuple[Box, bool, float]]) -> dict[str, Any]:
        hits = sum(hit for _, hit, _ in items)
        ious = np.array([iou for _, _, iou in items])
        groups = np.array([b.image for b, _, _ in items])
        return {
            "boxes": len(items), "images": len(set(groups.tolist())), "hits": int(hits),
            "hit_rate": hits / len(items), "hit_rate_ci": list(wilson_interval(hits, len(items))),
            "mean_iou": float(ious.mean()),
            "mean_iou_ci": list(bootstrap_mean_by_group(ious, groups, resamples, seed)),
        }

    findings = {f: summary([p for p in per_box if p[0].finding == f])
                for f in classes if any(p[0].finding == f for p in per_box)}
    return {
        "threshold": threshold, "tolerance_px": tolerance_px, "image_size": image_size,
        # The map's resolution beside the boxes': a peak cannot be placed more finely than
        # a cell, so boxes smaller than one are a limit of the input size, not of the model.
        "map_cell_px": spec.cell_px,
        "median_box_px": float(np.median(box_sides)),
        "findings": findings,
        "overall": summary(per_box),
        "skipped": {"no_image": len(no_image), "not_a_class": len(other)},
        "ci": "hit rate: 95% Wilson interval over boxes; IoU: 95% percentile bootstrap "
              f"over images ({resamples} resamples, seed {seed})",
    }


def render_localization_markdown(report: Mapping[str, Any]) -> str:
    """A markdown table of a :func:`localization_report`: one row per finding, then all."""

    def ci(values: Sequence[float]) -> str:
        return "n/a" if any(math.isnan(v) for v in values) else f"{values[0]:.3f}-{values[1]:.3f}"

    lines = [
        f"| finding | boxes | pointing game [95% CI] | mean IoU @ {report['threshold']:g} of max "
        "[95% CI] |",
        "|---|---:|---:|---:|",
    ]
    rows = [*report["findings"].items(), ("**all**", report["overall"])]
    for name, s in rows:
        lines.append(f"| {name} | {s['boxes']} | {s['hit_rate']:.3f} [{ci(s['hit_rate_ci'])}] | "
                     f"{s['mean_iou']:.3f} [{ci(s['mean_iou_ci'])}] |")
    skipped = report["skipped"]
    note = f"\n{report['ci']}."
    cell, box = report.get("map_cell_px"), report.get("median_box_px")
    if cell is not None and box is not None:
        note += (f" Heatmap cells are {cell:g} px apart at {report['image_size']} px input; the "
                 f"median box is {box:.0f} px.")
        if cell > box:
            note += (" **The map is coarser than the boxes**: a peak lands on a cell, so low "
                     "hit rates here measure the resolution as much as the model; evaluate at "
                     "a larger data.image_size.")
    if report.get("tolerance_px"):
        note += (f" Pointing game: a maximum within {report['tolerance_px']:g} px (box list "
                 "pixels) of the box counts as a hit.")
    if skipped["no_image"] or skipped["not_a_class"]:
        note += (f" Skipped: {skipped['no_image']} box(es) of images not evaluated, "
                 f"{skipped['not_a_class']} of findings the model does not output.")
    return "\n".join(lines) + "\n" + note + "\n"
