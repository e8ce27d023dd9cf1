"""Image decoding: real PNGs, RGBA, folder layouts, and damaged files named in errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.data.cache import prepare_cache
from dist_ft.data.datasets import LabelledImages
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


def _small_png(path: Path, side: int) -> Path:
    Image.new("L", (side, side), 90).save(path)
    return path


@pytest.mark.parametrize("factor", [3.0, 1.5])  # PIL raises above 2x its limit, warns below
def test_an_image_over_the_decompression_bomb_limit_is_an_image_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    bomb = _small_png(tmp_path / "bomb.png", 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(100 * 100 / factor))
    filters = list(warnings.filters)
    for load in (load_gray, lambda p: load_gray_resized(p, 16)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no DecompressionBombWarning escapes
            with pytest.raises(ImageError, match=rf"{bomb}: not decoded, too many pixels for PIL "
                               rf"\(Image.MAX_IMAGE_PIXELS = {int(100 * 100 / factor)}\)"):
                load(bomb)
    assert warnings.filters == filters


def test_a_crafted_bomb_is_refused_at_pil_s_own_limit(tmp_path: Path) -> None:
    # 200 M one-bit pixels (over twice PIL's default limit) in a few kB of PNG.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match=rf"{bomb}: not decoded.*200000000 pixels"):
        load_gray(bomb)


def test_skip_replaces_a_bomb_and_records_it(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bomb, good = _small_png(tmp_path / "bomb.png", 100), _small_png(tmp_path / "ok.png", 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 10,000 px > 2 x 3,000
    ds = LabelledImages([bomb, good], np.eye(2, dtype=np.uint8), ["a", "b"], True, 1, 32,
                        on_bad_image="skip")
    ds.bad_image_log = tmp_path / "bad_images.jsonl"
    image, target = ds[0]
    assert image.shape == (1, 32, 32) and target.tolist() == [0.0, 1.0]  # the next one's
    record = json.loads(ds.bad_image_log.read_text())
    assert record["image"] == str(bomb) and "too many pixels" in record["reason"]
    strict = LabelledImages([bomb, good], np.eye(2, dtype=np.uint8), ["a", "b"], True, 1, 32)
    with pytest.raises(ImageError, match=str(bomb)):
        strict[0]


def test_prepare_stops_on_a_bomb_without_leaving_a_partial_shard(
        tiny_cxr14: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli) -> None:
    victim = sorted(tiny_cxr14.glob("images_*/images/*.png"))[3]
    _small_png(victim, 200)  # 40,000 px; the release's images are 64 x 64 = 4,096
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    out = tmp_path / "cache"
    result = run_cli("data", "prepare", str(tiny_cxr14), "--out", str(out), "--size", "16")
    assert result.code == 1 and f"{victim}: not decoded, too many pixels" in result.err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()
    manifest = prepare_cache(tiny_cxr14, tmp_path / "skip", size=16, on_bad_image="skip",
                             progress=False)
    assert [s["image"] for s in manifest["skipped"]] == [victim.name]
    assert "too many pixels" in manifest["skipped"][0]["reason"]
    assert not [p for p in (tmp_path / "skip").rglob("*") if p.name.endswith(".tmp")]
