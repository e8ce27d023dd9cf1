"""A synthetic twin of NIH ChestX-ray14: same files and quirks, learnable content.

``write_synthetic`` writes, under OUT, what a user has after unpacking the release:
``images_001/images/*.png`` (8-bit grayscale, a few RGBA), ``Data_Entry_2017.csv`` in the
2017 dialect (CRLF, trailing comma, padded ids, ``058Y`` ages) or ``Data_Entry_2017_v2020.csv``
in the 2020 one, and patient-wise ``train_val_list.txt`` / ``test_list.txt``. Patients have
several follow-up images. Each finding draws its own pattern (disk, ring, stripes, checks...)
in its own region of a chest-like background, so a short fine-tune can learn all 14.
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
HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


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
def _canvas(size: int) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Background (lungs, mediastinum, gradient) and one pattern patch per finding."""
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
    }
    patches = []
    for k in range(len(FINDINGS)):
        cell_y, cell_x = divmod(k + 1, 4)  # a 4x4 grid; skip the top-left corner
        cy = int((cell_y + 0.5) * size / 4)
        cx = int((cell_x + 0.5) * size / 4)
        patches.append((cy, cx, shapes[_PATTERNS[k % len(_PATTERNS)]].astype(np.float32) * 80))
    return base.astype(np.float32), patches


def render(row: SynthRow, size: int, seed: int) -> Image.Image:
    """Draw one image: background with jitter and noise, plus each finding's pattern."""
    rng = np.random.default_rng([seed, row.patient, row.follow_up])
    base, patches = _canvas(size)
    img = base * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    img += rng.standard_normal((size, size), dtype=np.float32) * 4
    jitter = max(1, size // 40)
    for k in row.labels:
        cy, cx, patch = patches[k]
        h = patch.shape[0] // 2
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
        y0, x0 = max(0, cy - h + dy), max(0, cx - h + dx)
        y1, x1 = min(size, y0 + 2 * h), min(size, x0 + 2 * h)
        img[y0:y1, x0:x1] += patch[: y1 - y0, : x1 - x0]
    gray = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")
    if row.rgba:  # like the ~519 RGBA files of the release: gray in RGB, opaque alpha
        alpha = Image.new("L", gray.size, 255)
        return Image.merge("RGBA", (gray, gray, gray, alpha))
    return gray


def _write_chunk(args: tuple[list[tuple[Path, SynthRow]], int, int]) -> int:
    items, size, seed = args
    for path, row in items:
        render(row, size, seed).save(path, format="PNG")
    return len(items)


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
        progress: show a progress bar.
    """
    if dialect not in ("2017", "2020"):
        raise ValueError(f"dialect must be '2017' or '2020', got {dialect!r}")
    if images < 1 or size < 16:
        raise ValueError("need at least 1 image of at least 16 px")
    out = Path(out)
    rows = plan_rows(images, seed)
    items = []
    for k, row in enumerate(rows):
        folder = out / f"images_{k // per_folder + 1:03d}" / "images"
        items.append((folder / row.image, row))
    for folder in {p.parent for p, _ in items}:
        folder.mkdir(parents=True, exist_ok=True)
    chunk = 64
    jobs = [(items[i : i + chunk], size, seed) for i in range(0, len(items), chunk)]
    from tqdm import tqdm

    bar = tqdm(total=len(items), unit="img", disable=not progress, desc="synth")
    if workers <= 1:
        for job in jobs:
            bar.update(_write_chunk(job))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_write_chunk, jobs):
                bar.update(done)
    bar.close()

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
