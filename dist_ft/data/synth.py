"""A synthetic twin of NIH ChestX-ray14: same files and quirks, learnable content.

``write_synthetic`` writes, under OUT, what a user has after unpacking the release:
``images_001/images/*.png`` (8-bit grayscale, a few RGBA), ``Data_Entry_2017.csv`` in the
2017 dialect (CRLF, trailing comma, padded ids, ``058Y`` ages) or ``Data_Entry_2017_v2020.csv``
in the 2020 one, patient-wise ``train_val_list.txt`` / ``test_list.txt``, and
``BBox_List_2017.csv`` (boxes of the 8 boxed findings for part of their positive images).
Patients have several follow-up images. Each finding draws its own pattern (disk, ring,
stripes, checks...) in its own region of a chest-like background, so a short fine-tune can
learn all 14 (and Grad-CAM can be scored against the boxes).
Deterministic for a seed, whatever the number of workers.
"""

from __future__ import annotations

import csv
import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from dist_ft.data.findings import FINDINGS, NO_FINDING
from dist_ft.data.splits import TEST_LIST, TRAIN_VAL_LIST

# Per-image prevalence of each finding (in FINDINGS order), about the real ordering.
PREVALENCE = np.array(
    [0.10, 0.05, 0.05, 0.04, 0.12, 0.04, 0.04, 0.03, 0.15, 0.06, 0.06, 0.04, 0.04, 0.05]
)
_PATTERNS = ("disk", "ring", "hstripes", "vstripes", "checks", "diagonal", "cross")
# With distinct_patterns, findings 7-13 get these instead of reusing the 7 above.
# Each stays inside the disk, as the 7 do, so no evidence touches the box edge.
_MORE_PATTERNS = ("diamond", "dot", "antidiagonal", "xcross", "halfdisk", "quarters", "bullseye")
HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


# (x, y, w, h) in pixels of the written image, as in BBox_List_2017.csv.
Box = tuple[int, int, int, int]

# The box list of the release: its header (the bracketed name holds commas, and three empty
# names follow), the 8 findings it has boxes for, and its spelling "Infiltrate".
BBOX_LIST = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BOX_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax")
BBOX_LABEL = {"Infiltration": "Infiltrate"}


@dataclass(frozen=True)
class SynthRow:
    """One synthetic image's metadata."""

    image: str
    labels: tuple[int, ...]
    follow_up: int
    patient: int
    age: int
    sex: str
    view: str
    rgba: bool


def plan_rows(images: int, seed: int, rgba_every: int = 50) -> list[SynthRow]:
    """Draw patients, follow-ups, labels and demographics for ``images`` images."""
    rng = np.random.default_rng(seed)
    rows: list[SynthRow] = []
    patient = 0
    while len(rows) < images:
        patient += 1
        count = min(int(rng.geometric(0.45)), 8, images - len(rows))
        age, sex = int(rng.integers(1, 95)), str(rng.choice(["M", "F"]))
        for follow_up in range(count):
            labels = tuple(int(i) for i in np.flatnonzero(rng.random(len(FINDINGS)) < PREVALENCE))
            k = len(rows)
            rows.append(SynthRow(
                image=f"{patient:08d}_{follow_up:03d}.png",
                labels=labels,
                follow_up=follow_up,
                patient=patient,
                age=age + follow_up // 3,
                sex=sex,
                view="PA" if rng.random() < 0.6 else "AP",
                rgba=rgba_every > 0 and k % rgba_every == rgba_every // 2,
            ))
    return rows


@cache
def _canvas(size: int, distinct: bool = False) -> tuple[np.ndarray,
                                                        list[tuple[int, int, np.ndarray]]]:
    """Background (lungs, mediastinum, gradient) and one pattern patch per finding.

    By default the 7 patterns repeat (finding ``k`` draws pattern ``k % 7``), so a pattern alone
    does not tell two findings apart, its cell does; ``distinct`` gives each its own pattern.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 150 + 40 * yy
    for cx in (0.3, 0.7):  # two darker lung fields
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
        base = np.where(lung, base - 70, base)
    base = np.where(np.abs(xx - 0.5) < 0.05, base + 30, base)
    r = max(3, size // 9)
    py, px = np.mgrid[-r:r, -r:r].astype(np.float32)
    inside = (py**2 + px**2) < r**2
    period = max(2, r // 2)
    shapes = {
        "disk": inside,
        "ring": inside & ((py**2 + px**2) > (0.55 * r) ** 2),
        "hstripes": inside & ((py // period) % 2 == 0),
        "vstripes": inside & ((px // period) % 2 == 0),
        "checks": inside & (((py // period) + (px // period)) % 2 == 0),
        "diagonal": inside & (((py + px) // period) % 2 == 0),
        "cross": inside & ((np.abs(py) < r / 4) | (np.abs(px) < r / 4)),
        "diamond": (np.abs(py + 0.5) + np.abs(px + 0.5)) < r,
        "dot": (py**2 + px**2) < (0.5 * r) ** 2,
        "antidiagonal": inside & (((py - px) // period) % 2 == 0),
        "xcross": inside & ((np.abs(py - px) < r / 3) | (np.abs(py + px) < r / 3)),
        "halfdisk": inside & (py < 0),
        "quarters": inside & ((py + 0.5) * (px + 0.5) > 0),
        "bullseye": ((py**2 + px**2) < (0.35 * r) ** 2) | (inside & ((py**2 + px**2)
                                                                     > (0.7 * r) ** 2)),
    }
    names = (*_PATTERNS, *_MORE_PATTERNS) if distinct else _PATTERNS
    patches = []
    for k in range(len(FINDINGS)):
        cell_y, cell_x = divmod(k + 1, 4)  # a 4x4 grid; skip the top-left corner
        cy = int((cell_y + 0.5) * size / 4)
        cx = int((cell_x + 0.5) * size / 4)
        patches.append((cy, cx, shapes[names[k % len(names)]].astype(np.float32) * 80))
    return base.astype(np.float32), patches


def _draw(row: SynthRow, size: int, seed: int,
          distinct: bool = False) -> tuple[np.ndarray, dict[int, Box]]:
    """The float image of ``row`` and, per finding drawn, its patch's box (x, y, w, h).

    The boxes (and every random draw) do not depend on ``distinct``, only the patterns do.
    """
    rng = np.random.default_rng([seed, row.patient, row.follow_up])
    base, patches = _canvas(size, distinct)
    img = base * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    img += rng.standard_normal((size, size), dtype=np.float32) * 4
    jitter = max(1, size // 40)
    boxes: dict[int, Box] = {}
    for k in row.labels:
        cy, cx, patch = patches[k]
        h = patch.shape[0] // 2
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
        y0, x0 = max(0, cy - h + dy), max(0, cx - h + dx)
        y1, x1 = min(size, y0 + 2 * h), min(size, x0 + 2 * h)
        img[y0:y1, x0:x1] += patch[: y1 - y0, : x1 - x0]
        boxes[k] = (x0, y0, x1 - x0, y1 - y0)
    return img, boxes


def finding_region(finding: str | int, size: int) -> Box:
    """The square ``(x, y, w, h)`` where a finding's pattern can appear in a ``size`` image.

    Each finding is drawn in its own cell of a 4x4 grid; the box covers the pattern at every
    jitter offset (an image's own box, :func:`image_boxes`, is inside it).

    Args:
        finding: a name of :data:`FINDINGS` or its index.
        size: the side of the square image, in pixels.

    Raises:
        ValueError: ``finding`` is not one of the 14 findings.
    """
    k = _finding_index(finding)
    cy, cx, patch = _canvas(size)[1][k]
    h, jitter = patch.shape[0] // 2, max(1, size // 40)
    x0, y0 = max(0, cx - h - jitter), max(0, cy - h - jitter)
    x1, y1 = min(size, cx + h + jitter), min(size, cy + h + jitter)
    return (x0, y0, x1 - x0, y1 - y0)


def image_boxes(row: SynthRow, size: int, seed: int) -> dict[str, Box]:
    """Finding name -> the box ``(x, y, w, h)`` of its pattern as drawn in ``row``'s image."""
    return {FINDINGS[k]: box for k, box in _draw(row, size, seed)[1].items()}


def _finding_index(finding: str | int) -> int:
    if isinstance(finding, int) and 0 <= finding < len(FINDINGS):
        return finding
    if finding in FINDINGS:
        return FINDINGS.index(str(finding))
    raise ValueError(f"unknown finding {finding!r}; findings: {', '.join(FINDINGS)}")


def render(row: SynthRow, size: int, seed: int,
           distinct_patterns: bool = False) -> Image.Image:
    """Draw one image: background with jitter and noise, plus each finding's pattern.

    Args:
        row: the image's metadata.
        size: side of the square image.
        seed: the dataset's seed.
        distinct_patterns: a pattern of its own per finding (see :func:`write_synthetic`).
    """
    return _to_image(_draw(row, size, seed, distinct_patterns)[0], row)


def _to_image(img: np.ndarray, row: SynthRow) -> Image.Image:
    gray = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")
    if row.rgba:  # like the ~519 RGBA files of the release: gray in RGB, opaque alpha
        alpha = Image.new("L", gray.size, 255)
        return Image.merge("RGBA", (gray, gray, gray, alpha))
    return gray


def _write_chunk(args: tuple[list[tuple[Path, SynthRow]], int, int, bool]
                 ) -> list[dict[int, Box]]:
    """Render and save a chunk; return each image's boxes (drawn anyway, so free here)."""
    items, size, seed, distinct = args
    boxes = []
    for path, row in items:
        img, drawn = _draw(row, size, seed, distinct)
        _to_image(img, row).save(path, format="PNG")
        boxes.append(drawn)
    return boxes


def bbox_csv_text(rows: list[SynthRow], boxes: list[dict[int, Box]], fraction: float,
                  seed: int) -> str:
    """``BBox_List_2017.csv`` for a share of the images positive for the 8 boxed findings.

    Args:
        rows: the images, in order.
        boxes: per image, finding index -> the drawn box (from rendering).
        fraction: chance that a positive (image, boxed finding) pair gets its box listed.
        seed: the draw of that subset (its own stream: nothing else changes with it).

    Returns:
        The file's text in the release's layout: its header, LF line ends, ``Infiltrate``,
        grouped by finding, coordinates as floats in the written image's pixels.
    """
    rng = np.random.default_rng([seed, 2017])
    picked = [(row, k) for row in rows for k in row.labels
              if FINDINGS[k] in BOX_FINDINGS and rng.random() < fraction]
    by_image = {row.image: drawn for row, drawn in zip(rows, boxes, strict=True)}
    lines = [BBOX_HEADER]
    for name in BOX_FINDINGS:
        k = FINDINGS.index(name)
        for row, _ in (p for p in picked if p[1] == k):
            x, y, w, h = by_image[row.image][k]
            lines.append(f"{row.image},{BBOX_LABEL.get(name, name)},"
                         f"{float(x)!r},{float(y)!r},{float(w)!r},{float(h)!r}")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[SynthRow], size: int, dialect: str) -> str:
    buf = io.StringIO(newline="")
    if dialect == "2017":
        buf.write(HEADER_2017 + "\r\n")
    else:
        buf.write(HEADER_2017.rstrip(",") + "\n")
    writer = csv.writer(buf, lineterminator="\r\n" if dialect == "2017" else "\n")
    for r in rows:
        labels = "|".join(FINDINGS[i] for i in r.labels) or NO_FINDING
        spacing = "0.143"
        if dialect == "2017":
            writer.writerow([r.image, labels, f"{r.follow_up:03d}", f"{r.patient:08d}",
                             f"{r.age:03d}Y", r.sex, r.view, size, size, spacing, spacing, ""])
        else:
            writer.writerow([r.image, labels, r.follow_up, r.patient, r.age, r.sex, r.view,
                             size, size, spacing, spacing])
    return buf.getvalue()


def write_synthetic(
    out: str | Path,
    images: int = 600,
    size: int = 256,
    seed: int = 0,
    dialect: str = "2017",
    per_folder: int = 1000,
    test_fraction: float = 0.2,
    workers: int = 1,
    progress: bool = False,
    box_fraction: float = 0.5,
    distinct_patterns: bool = False,
) -> list[SynthRow]:
    """Write a synthetic ChestX-ray14 release under ``out`` and return its rows.

    Args:
        out: target folder (created; existing files of the same names are replaced).
        images: number of images.
        size: side of the square PNGs.
        seed: everything drawn depends on it alone.
        dialect: ``2017`` (original CSV quirks) or ``2020`` (revised CSV).
        per_folder: images per ``images_NNN/images/`` folder, as the tarballs unpack.
        test_fraction: share of patients in ``test_list.txt``.
        workers: processes rendering PNGs.
        progress: show progress on stderr (see :func:`dist_ft.console.progress`).
        box_fraction: share of the (image, finding) pairs positive for one of the 8 boxed
            findings whose box is listed in ``BBox_List_2017.csv`` (0: no box file).
        distinct_patterns: draw each of the 14 findings with a pattern of its own instead of
            7 patterns shared by two findings each (told apart only by their cells). Opt-in
            (the default images stay as they are): with it, a finding's evidence lies only
            inside its box, which the pointing-game test of Grad-CAM relies on. Labels,
            boxes and every other file are the same either way.
    """
    if dialect not in ("2017", "2020"):
        raise ValueError(f"dialect must be '2017' or '2020', got {dialect!r}")
    if images < 1 or size < 16:
        raise ValueError("need at least 1 image of at least 16 px")
    if not 0 <= box_fraction <= 1:
        raise ValueError(f"box_fraction must be within [0, 1], got {box_fraction}")
    out = Path(out)
    rows = plan_rows(images, seed)
    items = []
    for k, row in enumerate(rows):
        folder = out / f"images_{k // per_folder + 1:03d}" / "images"
        items.append((folder / row.image, row))
    for folder in {p.parent for p, _ in items}:
        folder.mkdir(parents=True, exist_ok=True)
    chunk = 64
    jobs = [(items[i : i + chunk], size, seed, distinct_patterns)
            for i in range(0, len(items), chunk)]
    from dist_ft.console import progress as show_progress

    bar = show_progress(total=len(items), unit="img", enabled=progress, desc="synth")
    boxes: list[dict[int, Box]] = []
    if workers <= 1:
        for job in jobs:
            boxes += _write_chunk(job)
            bar.update(len(job[0]))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_write_chunk, jobs):
                boxes += done
                bar.update(len(done))
    bar.close()
    if box_fraction > 0:
        (out / BBOX_LIST).write_bytes(bbox_csv_text(rows, boxes, box_fraction, seed).encode())

    name = "Data_Entry_2017.csv" if dialect == "2017" else "Data_Entry_2017_v2020.csv"
    (out / name).write_bytes(_csv_text(rows, size, dialect).encode())
    patients = sorted({r.patient for r in rows})
    rng = np.random.default_rng(seed + 1)
    test_patients = set(
        rng.choice(patients, size=round(test_fraction * len(patients)), replace=False).tolist()
    )
    test = sorted(r.image for r in rows if r.patient in test_patients)
    train_val = sorted(r.image for r in rows if r.patient not in test_patients)
    (out / TEST_LIST).write_text("".join(f"{n}\n" for n in test))
    (out / TRAIN_VAL_LIST).write_text("".join(f"{n}\n" for n in train_val))
    return rows
