"""Image decoding: real PNGs, RGBA, folder layouts, and damaged files named in errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.data.images import ImageError, find_images, load_gray, load_gray_resized
from tests.conftest import REAL_CXR14


@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_real_pngs_load_as_one_channel(name: str) -> None:
    image = load_gray(REAL_CXR14 / name)
    assert image.shape == (512, 512) and image.dtype == np.uint8
    assert image.std() > 10  # a real radiograph, not a blank
    small = load_gray_resized(REAL_CXR14 / name, 64)
    assert small.shape == (64, 64)
    # Antialiased: the 64 px image matches the mean of 8x8 blocks closely.
    blocks = image.reshape(64, 8, 64, 8).mean((1, 3))
    assert np.abs(small.astype(float) - blocks).mean() < 3


def test_rgba_png_loads_as_one_channel(tmp_path: Path) -> None:
    gray = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    g = Image.fromarray(gray, "L")
    Image.merge("RGBA", (g, g, g, Image.new("L", g.size, 255))).save(tmp_path / "x.png")
    image = load_gray(tmp_path / "x.png")
    assert image.shape == (64, 64)
    assert np.abs(image.astype(int) - gray).max() <= 1


def test_sixteen_bit_png_is_rescaled(tmp_path: Path) -> None:
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "y.png")
    assert load_gray(tmp_path / "y.png").max() == 255


def test_damaged_images_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(good)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((REAL_CXR14 / "00000001_000.png").read_bytes()[:5000])
    text = tmp_path / "text.png"
    text.write_text("hello")
    cases = {tmp_path / "absent.png": "missing", empty: "empty", truncated: "cannot decode",
             text: "cannot decode"}
    for path, words in cases.items():
        with pytest.raises(ImageError) as info:
            load_gray(path)
        assert str(path) in str(info.value) and words in str(info.value)


def test_find_images_in_both_release_layouts(tmp_path: Path) -> None:
    for folder in ("images", "images_001/images", "images_002/images", "images_003"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / f"{folder.replace('/', '_')}.png").write_bytes(b"x")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert sorted(find_images(tmp_path)) == [
        "images.png", "images_001_images.png", "images_002_images.png", "images_003.png"
    ]
