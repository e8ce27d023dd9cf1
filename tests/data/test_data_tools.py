"""``dist-ft data stats`` / ``prepare`` explain themselves: where images were looked for,
shards sized by the rows kept, ImageFolder trees and CSV files."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.data.cache import CacheError, CacheReader, prepare_cache
from dist_ft.data.images import ImageError, load_gray_resized, locate_images
from tests.conftest import REAL_CXR14, CliResult

REAL_PNGS = ("00000001_000.png", "00027426_000.png")


def _real_release(root: Path, rows: int | None = None) -> Path:
    """The real v2020 metadata (its first ``rows`` rows plus the 2 real images' rows, or all
    of it) with the 2 real PNGs beside it, as a user copies a few files next to the CSV."""
    root.mkdir()
    source = REAL_CXR14 / "Data_Entry_2017_v2020.csv.gz"
    if rows is None:
        shutil.copy(source, root / source.name)
    else:
        lines = gzip.decompress(source.read_bytes()).decode().splitlines(keepends=True)
        keep = lines[: rows + 1] + [line for line in lines[rows + 1:]
                                    if line.startswith(REAL_PNGS)]
        (root / "Data_Entry_2017_v2020.csv").write_text("".join(keep))
    for name in REAL_PNGS:
        shutil.copy(REAL_CXR14 / name, root / name)
    return root


def test_image_lookup_finds_pngs_beside_the_metadata_after_the_release_folders(
    tmp_path: Path
) -> None:
    root = _real_release(tmp_path / "r", rows=10)
    (root / "images_001" / "images").mkdir(parents=True)
    shutil.copy(root / REAL_PNGS[0], root / "images_001" / "images" / REAL_PNGS[0])
    located = locate_images(root)
    assert set(located.paths) == set(REAL_PNGS)
    # The release's folders come first: a copy beside the metadata does not shadow them.
    assert located.paths[REAL_PNGS[0]] == root / "images_001" / "images" / REAL_PNGS[0]
    assert located.paths[REAL_PNGS[1]] == root / REAL_PNGS[1]
    assert located.folders == {"images_001/images": 1, "images_001": 0, ".": 2}
    assert "images/, images_*/images/, images_*/, ./" in located.looked_in()


def test_stats_finds_pngs_beside_the_real_metadata_and_says_where_it_looked(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    root = _real_release(tmp_path / "r")
    result = run_cli("data", "stats", str(root), "--json", "--check-images")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["format"] == "chestxray14" and doc["images"] == 112_120
    assert doc["images_found"] == 2 and doc["missing_images"] == 112_118
    assert doc["image_folders"] == {".": 2}
    assert doc["looked_in"] == ["images/", "images_*/images/", "images_*/", "./"]
    assert doc["bad_images"] == 0
    text = run_cli("data", "stats", str(root)).out
    assert "missing images: 112,118 of 112,120" in text
    assert "looked in images/, images_*/images/, images_*/, ./ under" in text
    assert "found PNGs in ./ (2 PNGs)" in text


def test_prepare_writes_shards_for_the_kept_rows_only(tmp_path: Path) -> None:
    root = _real_release(tmp_path / "r", rows=299)  # 300 rows listed, 2 images present
    out = tmp_path / "c"
    with pytest.raises(ImageError, match=r"298 image\(s\) of the 300 listed in .*"
                       r"looked in images/, images_\*/images/, images_\*/, \./ under .*"
                       r"found PNGs in \./ \(2 PNGs\)"):
        prepare_cache(root, out, size=32, shard_size=64, progress=False)
    manifest = prepare_cache(root, out, size=32, shard_size=64, on_bad_image="skip",
                             progress=False)
    kept, per_image = 2, 32 * 32
    shards = sorted(out.glob("shard_*.npy"))
    assert len(shards) == math.ceil(kept / 64) == len(manifest["shards"])
    header = 128  # an .npy header of a 3-d uint8 array
    assert sum(p.stat().st_size for p in shards) <= kept * per_image + header * len(shards)
    assert manifest["num_images"] == 300 and manifest["num_rows"] == manifest["num_valid"] == 2
    assert len((out / "missing_images.txt").read_text().split()) == 298
    reader = CacheReader(out, verify=True)
    assert sorted(str(n) for n in reader.images) == sorted(REAL_PNGS)
    for row, name in enumerate(reader.images):
        assert np.array_equal(reader.image(row), load_gray_resized(root / str(name), 32))
    # Other images present later means other rows: the shards are not reused silently.
    (root / REAL_PNGS[1]).unlink()
    with pytest.raises(CacheError, match=r"missing_images\.count: 298 in the cache, 299 now"):
        prepare_cache(root, out, size=32, shard_size=64, on_bad_image="skip", progress=False)
    (root / REAL_PNGS[0]).unlink()
    with pytest.raises(ImageError, match="none of them is there"):
        prepare_cache(root, tmp_path / "d", size=32, on_bad_image="skip", progress=False)


def _imagefolder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for label, n in classes.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    return root


def test_stats_on_an_imagefolder_tree(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "if", {"train": {"ants": 3, "bees": 2},
                                          "valid": {"ants": 1, "bees": 2}, "test": {"ants": 1}})
    (root / "train" / "bees" / "0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    result = run_cli("data", "stats", str(root), "--json", "--check-images")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["format"] == "imagefolder" and doc["classes"] == ["ants", "bees"]
    assert doc["splits"] == {"train": 5, "val": 3, "test": 1} and doc["images"] == 9
    assert doc["labels"] == {"ants": 5, "bees": 4}
    assert doc["split_labels"]["val"] == {"ants": 1, "bees": 2}
    assert doc["bad_images"] == 1
    assert doc["first_bad"][0]["image"] == "train/bees/0.jpg"
    assert "0.jpg: cannot decode image" in doc["first_bad"][0]["reason"]
    # test/ lacks bees: class index 0 would mean another class than in train.
    problems = [p.split(":")[0] for p in doc["problems"]]
    assert problems == ["the test split has classes ants but train has ants, bees"]
    text = run_cli("data", "stats", str(root)).out
    assert "class" in text and "bad images: not checked" in text and "problem:" in text


def _labels_csv(folder: Path, rows: int, present: int) -> Path:
    folder.mkdir()
    path = folder / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "findings", "patient"])
        for i in range(rows):
            writer.writerow([f"img/{i}.png", ["cat|dog", "dog", "", "cat"][i % 4], i // 2])
    (folder / "img").mkdir()
    for i in range(present):
        Image.new("L", (20, 20), 100).save(folder / "img" / f"{i}.png")
    return path


def test_stats_on_a_csv_file(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    path = _labels_csv(tmp_path / "d", rows=12, present=10)
    result = run_cli("data", "stats", str(path))
    assert result.code == 2
    assert "--data csv.label_column=COLUMN" in result.err
    assert "its header is file, findings, patient" in result.err
    flags = ["--data", "csv.path_column=file", "--data", "csv.label_column=findings",
             "--data", "csv.patient_column=patient"]
    result = run_cli("data", "stats", str(path), *flags, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["format"] == "csv" and doc["classes"] == ["cat", "dog"]
    assert doc["images"] == 12 and doc["patients"] == 6 and doc["patient_overlap"] == 0
    assert doc["labels"] == {"cat": 6, "dog": 6} and sum(doc["splits"].values()) == 12
    assert doc["missing_images"] == 2 and doc["first_missing"] == ["img/10.png", "img/11.png"]
    text = run_cli("data", "stats", str(path), *flags).out
    assert "missing images: 2 of 12" in text and "taken relative to" in text
    result = run_cli("data", "stats", str(path), "--data", "csv.label_colum=findings")
    assert result.code == 2 and "data.csv.label_colum" in result.err


def test_prepare_caches_imagefolder_and_csv_with_the_csv_columns_named(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    folder = _imagefolder(tmp_path / "if", {"train": {"a": 1, "b": 2}, "val": {"a": 1}})
    result = run_cli("data", "prepare", str(folder), "--out", str(tmp_path / "c1"),
                     "--size", "32")
    assert result.code == 1  # val/ lacks b: class indices would mean other classes
    assert "the val split has classes a but train has a, b" in result.err
    (folder / "val" / "b").mkdir()
    Image.new("RGB", (40, 30), (0, 90, 0)).save(folder / "val" / "b" / "0.png")
    result = run_cli("data", "prepare", str(folder), "--out", str(tmp_path / "c1"),
                     "--size", "32")
    assert result.code == 0, result.err
    assert "5 images at 32px" in result.out and "splits train 3, val 2, test 0" in result.out
    path = _labels_csv(tmp_path / "d", rows=4, present=4)
    result = run_cli("data", "prepare", str(path), "--out", str(tmp_path / "c2"))
    assert result.code == 2  # the labels' column must be named, as for data stats
    assert "--data csv.label_column=COLUMN" in result.err
    assert not (tmp_path / "c2").exists()
    result = run_cli("data", "prepare", str(path), "--out", str(tmp_path / "c2"), "--size", "32",
                     "--data", "csv.path_column=file", "--data", "csv.label_column=findings",
                     "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["num_valid"] == 4
    assert CacheReader(tmp_path / "c2").classes == ["cat", "dog"]


def test_an_unknown_layout_names_what_was_looked_for(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    result = run_cli("data", "stats", str(tmp_path))
    assert result.code == 1
    assert "no ChestX-ray14 metadata file (Data_Entry_2017_v2020.csv" in result.err
    assert "no ImageFolder split folder (train/, val/, valid/, test/)" in result.err


def test_training_on_missing_images_says_where_it_looked(tmp_path: Path) -> None:
    from dist_ft.config.schema import DataConfig
    from dist_ft.data.datasets import build_dataset
    from dist_ft.data.metadata import MetadataError

    root = _real_release(tmp_path / "r", rows=30)
    with pytest.raises(MetadataError) as err:
        build_dataset(DataConfig(root=str(root), split_seed=0), "train")
    message = str(err.value)
    assert "not under" in message and "data.on_bad_image=skip" in message
    assert "looked in images/, images_*/images/, images_*/, ./" in message
    assert "found PNGs in ./ (2 PNGs)" in message
