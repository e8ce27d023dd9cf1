"""The synthetic twin has the release's layout and quirks and is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.data.images import find_images, load_gray
from dist_ft.data.metadata import read_metadata
from dist_ft.data.splits import patient_overlap, resolve_splits
from dist_ft.data.synth import write_synthetic


def test_layout_and_2017_quirks(tiny_cxr14_session: Path) -> None:
    root = tiny_cxr14_session
    raw = (root / "Data_Entry_2017.csv").read_bytes()
    assert raw.count(b"\r\n") == 41 and raw.splitlines()[1].endswith(b",")
    first = raw.splitlines()[1].decode().split(",")
    assert first[2] == "000" and len(first[3]) == 8 and first[4].endswith("Y")
    assert {p.parent.parent.name for p in root.glob("images_*/images/*.png")} == {
        "images_001", "images_002"}
    meta = read_metadata(root / "Data_Entry_2017.csv")
    assert len(meta) == 40 and len(find_images(root)) == 40
    assert len(np.unique(meta.patients)) < 40  # patients have follow-ups
    split = resolve_splits(meta, root, 0.2, 0.2, seed=0)
    assert patient_overlap(meta.patients, split) == 0
    modes = {Image.open(p).mode for p in root.glob("images_*/images/*.png")}
    assert modes == {"L", "RGBA"}
    rgba = next(p for p in root.glob("images_*/images/*.png") if Image.open(p).mode == "RGBA")
    assert load_gray(rgba).shape == (64, 64)


def test_2020_dialect(tmp_path: Path) -> None:
    write_synthetic(tmp_path, images=12, size=32, seed=1, dialect="2020")
    text = (tmp_path / "Data_Entry_2017_v2020.csv").read_text()
    assert "\r" not in text and not text.splitlines()[1].endswith(",")
    assert len(read_metadata(tmp_path / "Data_Entry_2017_v2020.csv")) == 12


def test_deterministic_whatever_the_workers(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a, images=70, size=32, seed=9, workers=1)
    write_synthetic(b, images=70, size=32, seed=9, workers=2)
    assert (a / "Data_Entry_2017.csv").read_bytes() == (b / "Data_Entry_2017.csv").read_bytes()
    for p in a.glob("images_*/images/*.png"):
        assert np.array_equal(load_gray(p), load_gray(b / p.relative_to(a)))


def test_findings_draw_visible_patterns(tmp_path: Path) -> None:
    rows = write_synthetic(tmp_path, images=60, size=64, seed=2)
    found = find_images(tmp_path)
    with_mass = [r for r in rows if 9 in r.labels]  # Mass
    without = [r for r in rows if not r.labels]
    assert with_mass and without
    # Mass is drawn in grid cell (2, 2), centred at (40, 40): brighter there than around.
    def contrast(r) -> float:
        image = load_gray(found[r.image]).astype(float)
        return float(image[36:44, 36:44].mean() - image[20:60, 20:60].mean())
    assert min(contrast(r) for r in with_mass) > max(contrast(r) for r in without) + 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dialect"):
        write_synthetic("/nonexistent", images=1, dialect="2019")
