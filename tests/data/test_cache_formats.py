"""``dist-ft data prepare`` of ImageFolder trees and CSV files: the cache gives training the
same images, labels and splits as the files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_ft.config.schema import CsvConfig, DataConfig
from dist_ft.data.cache import CacheError, CacheReader, prepare_cache
from dist_ft.data.datasets import build_dataset, class_names, collate
from tests.conftest import CONFIGS, REPO, CliResult, plain_env

CSV_DATA = ["csv.path_column=file", "csv.label_columns=[cat, dog]", "csv.patient_column=pid"]


def _picture(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A colour image of noise (so RGB channels and the resize matter), PNG or JPEG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def _imagefolder(root: Path) -> Path:
    """train/ and val/ with ants and bees; non-square PNGs and JPEGs."""
    seed = 0
    for split, count in (("train", 4), ("val", 2)):
        for label in ("ants", "bees"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                _picture(folder / f"{i}.{'png' if i % 2 else 'jpg'}", seed, (40, 30))
    return root


def _labels_csv(folder: Path, rows: int = 12) -> Path:
    """A multi-label CSV (0/1 columns cat, dog; two images per patient) and its images."""
    (folder / "img").mkdir(parents=True)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "cat", "dog", "pid"])
        for i in range(rows):
            writer.writerow([f"img/{i}.png", i % 2, int(i % 3 == 0), f"p{i // 2}"])
            _picture(folder / "img" / f"{i}.png", 100 + i, (30, 36))
    return path


def _csv_config(path: Path, **kw: object) -> DataConfig:
    spec = CsvConfig(file=str(path), path_column="file", label_columns=["cat", "dog"],
                     patient_column="pid")
    return DataConfig(format="csv", csv=spec, image_size=32, load_size=32, **kw)


def _assert_same(files: torch.utils.data.Dataset, cached: torch.utils.data.Dataset) -> None:
    """Same classes, targets, sample_info and pixels, item by item and as one batch."""
    assert len(files) == len(cached) > 0
    assert cached.classes == files.classes and cached.multilabel == files.multilabel
    assert cached.channels == files.channels == 3
    assert set(cached.sample_info) == set(files.sample_info)
    for key, values in files.sample_info.items():
        assert list(cached.sample_info[key]) == list(values), key
    for i in range(len(files)):
        (a, ya), (b, yb) = files[i], cached[i]
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 32, 32)
        assert torch.equal(a, b), files.sample_info["image"][i]
        assert ya.dtype == yb.dtype and torch.equal(ya, yb)
    # The batched read (what a DataLoader calls) gives the same tensors as the files.
    every = list(range(len(files)))
    batch, expected = collate(cached.__getitems__(every)), collate([files[i] for i in every])
    assert torch.equal(batch[0], expected[0]) and torch.equal(batch[1], expected[1])
    assert batch[1].dtype == expected[1].dtype


def test_an_imagefolder_cache_gives_the_files_images_labels_and_splits(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "if")
    manifest = prepare_cache(root, tmp_path / "c", size=32, progress=False)
    assert manifest["format"] == "imagefolder" and manifest["classes"] == ["ants", "bees"]
    assert manifest["multilabel"] is False and manifest["channels"] == 3
    assert manifest["splits"] == {"train": 8, "val": 4, "test": 0}
    from_files = DataConfig(format="imagefolder", root=str(root), image_size=32, load_size=32)
    # The recipe needs no data.root with a cache: classes and rows come from it.
    from_cache = DataConfig(format="imagefolder", cache=str(tmp_path / "c"), image_size=32)
    for split in ("train", "val"):
        files, cached = build_dataset(from_files, split), build_dataset(from_cache, split)
        _assert_same(files, cached)
        assert cached.targets.dtype == np.int64 and sorted(set(cached.targets)) == [0, 1]
    assert class_names(from_cache) == class_names(from_files) == ["ants", "bees"]


def test_a_csv_cache_gives_the_files_images_labels_and_splits(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    path = _labels_csv(tmp_path / "d")
    out = tmp_path / "c"
    flags = [a for item in CSV_DATA for a in ("--data", item)]
    result = run_cli("data", "prepare", str(path), "--out", str(out), "--size", "32",
                     "--json", *flags)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["num_valid"] == 12 and sum(summary["splits"].values()) == 12
    reader = CacheReader(out, verify=True)
    assert reader.format == "csv" and reader.classes == ["cat", "dog"] and reader.multilabel
    assert reader.manifest["csv"]["patient_column"] == "pid"
    for split in ("train", "val", "test"):
        files = build_dataset(_csv_config(path), split)
        if len(files) == 0:
            continue
        _assert_same(files, build_dataset(_csv_config(path, cache=str(out)), split))
    assert sum(len(build_dataset(_csv_config(path), s)) for s in ("train", "val", "test")) == 12


def test_a_changed_csv_or_other_columns_are_refused(tmp_path: Path) -> None:
    path = _labels_csv(tmp_path / "d")
    out = tmp_path / "c"
    prepare_cache(path, out, size=32, shard_size=4, progress=False, data=CSV_DATA)
    # The same identity again: every shard is reused.
    redone: list[int] = []
    prepare_cache(path, out, size=32, shard_size=4, progress=False, data=CSV_DATA,
                  on_shard=redone.append)
    assert redone == []
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("img/0.png,0,1", "img/0.png,1,1")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CacheError, match=r"sha256\.labels\.csv: .*Pass --rebuild"):
        prepare_cache(path, out, size=32, shard_size=4, progress=False, data=CSV_DATA)
    with pytest.raises(CacheError, match=r"csv\.label_columns: "):
        prepare_cache(path, out, size=32, shard_size=4, progress=False,
                      data=[*CSV_DATA, "csv.label_columns=[dog, cat]"], rebuild=False)
    prepare_cache(path, out, size=32, shard_size=4, progress=False, data=CSV_DATA,
                  rebuild=True)
    reader = CacheReader(out)
    row = list(reader.images).index("img/0.png")
    assert reader.labels[row].tolist() == [1.0, 1.0]  # the new label, not the old one
    # A recipe with other columns or split settings than the cache's is refused.
    spec = CsvConfig(file=str(path), path_column="file", label_columns=["cat", "dog"])
    no_patients = DataConfig(format="csv", csv=spec, cache=str(out))
    with pytest.raises(CacheError, match=r"data\.csv\.patient_column is None in the recipe "
                       r"but 'pid' in the cache"):
        build_dataset(no_patients, "train")
    with pytest.raises(CacheError, match=r"data\.val_fraction is 0\.3 in the recipe"):
        build_dataset(_csv_config(path, cache=str(out), val_fraction=0.3), "train")
    with pytest.raises(CacheError, match=r"holds csv data but data\.format is imagefolder"):
        build_dataset(DataConfig(format="imagefolder", cache=str(out)), "train")


def test_an_interrupted_imagefolder_prepare_resumes(tmp_path: Path) -> None:
    root, out = _imagefolder(tmp_path / "if"), tmp_path / "c"

    def stop(shard: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_cache(root, out, size=32, shard_size=5, progress=False, on_shard=stop)
    assert not (out / "manifest.json").exists()
    redone: list[int] = []
    prepare_cache(root, out, size=32, shard_size=5, progress=False, on_shard=redone.append)
    assert redone == [1, 2]  # shard 0 was finished before the interruption
    # An image replaced since: the file list's digest changes, the old shards are refused.
    _picture(root / "val" / "ants" / "1.png", 999, (50, 30))
    with pytest.raises(CacheError, match=r"files\.sha256: "):
        prepare_cache(root, out, size=32, shard_size=5, progress=False)


def test_a_version_1_cache_is_still_read_and_an_unknown_one_refused(
    tiny_cxr14: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    prepare_cache(tiny_cxr14, out, size=32, progress=False)
    cfg = DataConfig(cache=str(out), image_size=32)
    now = [(x, y) for x, y in build_dataset(cfg, "train")]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("format", "classes", "multilabel", "channels", "patients_known"):
        del manifest[key]  # what version 1 did not record
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    v1 = build_dataset(cfg, "train")
    assert v1.channels == 1 and v1.multilabel and len(v1.classes) == 14
    assert all(torch.equal(a, b) and torch.equal(ya, yb)
               for (a, ya), (b, yb) in zip(now, v1, strict=True))
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CacheError, match=r"cache version 99, this dist-ft reads versions 1, 2; "
                       r"re-run dist-ft data prepare .* --rebuild"):
        build_dataset(cfg, "train")


def test_cache_is_allowed_for_imagefolder_and_csv_recipes_only() -> None:
    from pydantic import ValidationError

    DataConfig(format="imagefolder", cache="c")
    with pytest.raises(ValidationError, match=r"cache is supported with format: chestxray14, "
                       r"imagefolder or csv .*not chexpert"):
        DataConfig(format="chexpert", root="r", cache="c")


@pytest.mark.multiprocess
def test_training_the_imagefolder_recipe_on_its_cache(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "if")
    prepare_cache(root, tmp_path / "c", size=32, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(CONFIGS / "imagefolder_resnet18.yaml"),
         "data.root=null", f"data.cache={tmp_path / 'c'}", f"output_dir={tmp_path / 'run'}",
         "model.pretrained=none", "data.image_size=32", "data.batch_size=4",
         "data.num_workers=0", "trainer.max_steps=2", "trainer.epochs=1",
         "logging.every_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["val_samples"] == 4
