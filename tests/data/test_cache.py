"""The preprocessed cache: contents, resumption, bad images, corruption detection."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dist_ft.data.cache import CacheError, CacheReader, prepare_cache
from dist_ft.data.images import ImageError, find_images, load_gray_resized
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import TEST
from tests.conftest import CliResult


def test_cache_holds_each_image_resized_with_labels_and_splits(
    tiny_cxr14: Path, tmp_path: Path
) -> None:
    manifest = prepare_cache(tiny_cxr14, tmp_path / "c", size=32, shard_size=16, workers=2,
                             progress=False)
    assert manifest["num_images"] == 40 and len(manifest["shards"]) == 3
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    reader = CacheReader(tmp_path / "c", verify=True)
    found = find_images(tiny_cxr14)
    meta = read_metadata(find_metadata(tiny_cxr14))
    labels = dict(zip(meta.images, meta.labels, strict=True))
    for row in range(len(reader)):
        name = str(reader.images[row])
        assert np.array_equal(reader.image(row), load_gray_resized(found[name], 32)), name
        assert np.array_equal(reader.labels[row], labels[name])
    test_names = set((tiny_cxr14 / "test_list.txt").read_text().split())
    assert {str(n) for n in reader.images[reader.rows(TEST)]} == test_names
    assert sum(manifest["splits"].values()) == 40


def test_interrupted_prepare_resumes_without_redoing_shards(
    tiny_cxr14: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"

    def stop_after_first(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_cache(tiny_cxr14, out, size=32, shard_size=16, progress=False,
                      on_shard=stop_after_first)
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match=r"no manifest\.json; the cache is unfinished"):
        CacheReader(out)
    first = (out / "shard_00000.npy").stat().st_mtime_ns
    redone: list[int] = []
    prepare_cache(tiny_cxr14, out, size=32, shard_size=16, progress=False,
                  on_shard=redone.append)
    assert redone == [1, 2]
    assert (out / "shard_00000.npy").stat().st_mtime_ns == first
    CacheReader(out, verify=True)


def test_other_settings_are_refused(tiny_cxr14: Path, tmp_path: Path) -> None:
    prepare_cache(tiny_cxr14, tmp_path / "c", size=32, progress=False)
    with pytest.raises(CacheError, match=r"other settings \(size\)"):
        prepare_cache(tiny_cxr14, tmp_path / "c", size=48, progress=False)


def _damage(root: Path) -> tuple[str, str, str]:
    paths = sorted(root.glob("images_*/images/*.png"))
    paths[0].write_bytes(b"")
    paths[1].write_bytes(paths[1].read_bytes()[:200])
    paths[2].unlink()
    return paths[0].name, paths[1].name, paths[2].name


def test_bad_images_stop_prepare_naming_them(tiny_cxr14: Path, tmp_path: Path) -> None:
    empty, truncated, missing = _damage(tiny_cxr14)
    with pytest.raises(ImageError, match=rf"1 image\(s\).*first '{missing}'"):
        prepare_cache(tiny_cxr14, tmp_path / "c", size=32, progress=False)
    found = find_images(tiny_cxr14)
    good = sorted(found.values())[-1].read_bytes()
    (tiny_cxr14 / "images_001" / "images" / missing).write_bytes(good)
    with pytest.raises(ImageError, match=rf"{empty}: image file is empty"):
        prepare_cache(tiny_cxr14, tmp_path / "d", size=32, progress=False)
    found[empty].write_bytes(good)
    with pytest.raises(ImageError, match=rf"{truncated}: cannot decode"):
        prepare_cache(tiny_cxr14, tmp_path / "e", size=32, workers=2, progress=False)


def test_skip_records_bad_images_in_the_manifest(tiny_cxr14: Path, tmp_path: Path) -> None:
    bad = set(_damage(tiny_cxr14))
    manifest = prepare_cache(tiny_cxr14, tmp_path / "c", size=32, on_bad_image="skip",
                             progress=False)
    assert {s["image"] for s in manifest["skipped"]} == bad
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    assert "empty" in reasons and "cannot decode" in reasons and "not found" in reasons
    assert manifest["num_valid"] == 37
    reader = CacheReader(tmp_path / "c")
    assert bad.isdisjoint(str(n) for n in reader.images[reader.rows()])


def test_corrupt_or_truncated_shards_are_named(tiny_cxr14: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    prepare_cache(tiny_cxr14, out, size=32, shard_size=16, progress=False)
    shard = out / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    CacheReader(out)  # same size: only the checksum can tell
    with pytest.raises(CacheError, match=r"shard_00001\.npy: checksum mismatch"):
        CacheReader(out, verify=True)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CacheError, match=r"shard_00001\.npy: .* bytes, manifest says"):
        CacheReader(out)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard_00001\.npy: shard file is missing"):
        CacheReader(out)


def test_prepare_cli(run_cli: Callable[..., CliResult], tiny_cxr14: Path, tmp_path: Path) -> None:
    result = run_cli("data", "prepare", str(tiny_cxr14), "--out", str(tmp_path / "c"),
                     "--size", "32", "--shard-size", "10", "--workers", "2", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["num_images"] == 40 and summary["shards"] == 4 and summary["skipped"] == 0
    assert (tmp_path / "c" / "manifest.json").is_file()
