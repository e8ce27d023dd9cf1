"""The preprocessed cache: contents, resumption, bad images, corruption detection."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dist_ft import __version__
from dist_ft.config.schema import DataConfig, SplitFilesConfig
from dist_ft.data.cache import CacheError, CacheReader, prepare_cache
from dist_ft.data.datasets import build_dataset
from dist_ft.data.images import ImageError, find_images, load_gray_resized
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import TEST
from dist_ft.data.synth import write_synthetic
from tests.conftest import CONFIGS, REPO, CliResult, lists_by_patient, plain_env


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
    with pytest.raises(CacheError,
                       match=r"other data or settings \(size: 32 in the cache, 48 now\)"):
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
    empty, truncated, missing = _damage(tiny_cxr14)
    manifest = prepare_cache(tiny_cxr14, tmp_path / "c", size=32, on_bad_image="skip",
                             progress=False)
    bad = {empty, truncated, missing}
    assert {s["image"] for s in manifest["skipped"]} == {empty, truncated}
    reasons = " ".join(s["reason"] for s in manifest["skipped"])
    assert "empty" in reasons and "cannot decode" in reasons
    # A missing image gets no row at all; it is listed beside the manifest.
    assert manifest["missing_images"]["count"] == 1 and manifest["num_rows"] == 39
    assert (tmp_path / "c" / "missing_images.txt").read_text().split() == [missing]
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


# ----------------------------------------------------------------- identity
def _other_release(tmp_path: Path) -> Path:
    """Another 40-image release: same layout, file names and shard sizes, other content."""
    root = tmp_path / "other"
    write_synthetic(root, images=40, size=64, seed=4, per_folder=25)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_manifest_records_the_cache_identity(tiny_cxr14: Path, tmp_path: Path) -> None:
    manifest = prepare_cache(tiny_cxr14, tmp_path / "c", size=32, val_fraction=0.25,
                             split_seed=7, progress=False)
    assert manifest["root"] == str(tiny_cxr14.resolve())
    assert manifest["dist_ft_version"] == __version__ and manifest["size"] == 32
    assert set(manifest["sha256"]) == {"Data_Entry_2017.csv", "test_list.txt",
                                       "train_val_list.txt"}
    csv = (tiny_cxr14 / "Data_Entry_2017.csv").read_bytes()
    assert manifest["sha256"]["Data_Entry_2017.csv"] == hashlib.sha256(csv).hexdigest()
    assert manifest["split"] == {"val_fraction": 0.25, "test_fraction": 0.2, "seed": 7,
                                 "test_list": True}


def test_prepare_of_other_data_into_a_cache_is_refused_then_rebuilt(
    run_cli: Callable[..., CliResult], tiny_cxr14: Path, tmp_path: Path
) -> None:
    other, out = _other_release(tmp_path), tmp_path / "c"
    assert run_cli("data", "prepare", str(tiny_cxr14), "--out", str(out), "--size", "32",
                   "--json").code == 0
    before = _files(out)
    result = run_cli("data", "prepare", str(other), "--out", str(out), "--size", "32")
    assert result.code == 1
    assert f"dist-ft data: error: {out} holds a cache of other data or settings (root: " \
        f"{tiny_cxr14.resolve()} in the cache, {other.resolve()} now; " in result.err
    assert "sha256.Data_Entry_2017.csv: " in result.err
    assert "Pass --rebuild to replace it, or pick another --out" in result.err
    assert _files(out) == before  # nothing of the old cache touched
    result = run_cli("data", "prepare", str(other), "--out", str(out), "--size", "32",
                     "--rebuild", "--json")
    assert result.code == 0, result.err
    # Every row now carries the other release's label: no old shard was reused.
    reader = CacheReader(out, verify=True)
    meta = read_metadata(find_metadata(other))
    labels = dict(zip(meta.images, meta.labels, strict=True))
    found = find_images(other)
    for row in range(len(reader)):
        name = str(reader.images[row])
        assert np.array_equal(reader.labels[row], labels[name]), name
        assert np.array_equal(reader.image(row), load_gray_resized(found[name], 32)), name
    # The same identity again: every shard is reused, nothing redone.
    redone: list[int] = []
    prepare_cache(other, out, size=32, progress=False, on_shard=redone.append)
    assert redone == []


def test_cache_files_without_settings_are_not_reused(tiny_cxr14: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    prepare_cache(tiny_cxr14, out, size=32, progress=False)
    (out / "settings.json").unlink()
    with pytest.raises(CacheError, match=r"settings\.json: missing beside existing cache "
                       r"files \(unknown data\).*Pass --rebuild"):
        prepare_cache(tiny_cxr14, out, size=32, progress=False)
    stray = out / "notes.txt"
    stray.write_text("mine")
    redone: list[int] = []
    prepare_cache(tiny_cxr14, out, size=32, progress=False, rebuild=True,
                  on_shard=redone.append)
    assert redone == [0] and stray.read_text() == "mine"  # rebuild removes only cache files


def test_a_recipe_split_other_than_the_caches_is_refused(tiny_cxr14: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "c"
    prepare_cache(tiny_cxr14, out, size=32, val_fraction=0.3, progress=False)
    assert len(build_dataset(DataConfig(cache=str(out), val_fraction=0.3), "val")) > 0
    # The release has test_list.txt: test_fraction is unused, so it may differ.
    build_dataset(DataConfig(cache=str(out), val_fraction=0.3, test_fraction=0.1), "val")
    with pytest.raises(CacheError) as info:
        build_dataset(DataConfig(cache=str(out), val_fraction=0.1, split_seed=5), "train")
    assert str(info.value) == (
        f"data.cache {out} was split with other settings: data.val_fraction is 0.1 in the "
        "recipe but 0.3 in the cache; data.split_seed is 5 in the recipe but 0 in the cache. "
        f"Rebuild the cache (dist-ft data prepare {tiny_cxr14.resolve()} --out {out} --rebuild "
        "--val-fraction 0.1 --split-seed 5) or set data.val_fraction=0.3 data.split_seed=0 in "
        "the recipe")


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_training_from_a_cache_of_other_split_settings_fails_before_training(
    tiny_cxr14: Path, tmp_path: Path
) -> None:
    out = tmp_path / "c"
    prepare_cache(tiny_cxr14, out, size=32, progress=False)  # val_fraction 0.1
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(CONFIGS / "chestxray14_smoke.yaml"),
         f"data.cache={out}", "data.root=null", "data.image_size=32", "data.load_size=32",
         "trainer.backend=ddp", f"output_dir={tmp_path}/run"],  # the recipe: val_fraction 0.2
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 1
    line = next(x for x in result.stderr.splitlines() if x.startswith("dist-ft train: error:"))
    assert line.startswith(f"dist-ft train: error: data.cache {out} was split with other "
                           "settings: data.val_fraction is 0.2 in the recipe but 0.1 in the "
                           "cache."), line
    assert line.endswith("or set data.val_fraction=0.1 in the recipe")
    assert not list((tmp_path / "run").glob("checkpoints/*"))


# ----------------------------------------------------------------- split files
@pytest.fixture(scope="module")
def listed_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    """A 24-image 32 px twin and, in ``lists/``, train/val/test files by patient (one patient
    in no list), unlike the release's own test_list.txt."""
    root = tmp_path_factory.mktemp("listed")
    rows = write_synthetic(root / "data", images=24, size=32, seed=5)
    lists = lists_by_patient(rows)
    (root / "lists").mkdir()
    for role, names in lists.items():
        (root / "lists" / f"{role}.txt").write_text("\n".join(names) + "\n")
    return root, lists


def test_prepare_with_split_files_matches_only_a_recipe_with_the_same_files(
    run_cli: Callable[..., CliResult], listed_release: tuple[Path, dict[str, list[str]]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, lists = listed_release
    monkeypatch.chdir(root)  # relative paths, as typed: the cache records them resolved
    out = tmp_path / "c"
    result = run_cli("data", "prepare", "data", "--out", str(out), "--size", "32", "--json",
                     *[f"--split-file={role}=lists/{role}.txt" for role in lists])
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["splits"] == {role: len(names) for role, names in lists.items()}
    assert summary["num_images"] == sum(len(names) for names in lists.values()) < 24
    files = SplitFilesConfig(**{role: str(root / "lists" / f"{role}.txt") for role in lists})
    val = build_dataset(DataConfig(cache=str(out), split_files=files), "val")
    assert len(val) == len(lists["val"])
    with pytest.raises(CacheError, match=r"was split with other list files: data.split_files "
                       r"is none in the recipe but test=.*test\.txt"):
        build_dataset(DataConfig(cache=str(out)), "train")
    (root / "lists" / "val.txt").write_text("\n".join(lists["val"][:-1]) + "\n")
    try:
        with pytest.raises(CacheError, match="other list files"):  # edited since prepare
            build_dataset(DataConfig(cache=str(out), split_files=files), "val")
    finally:
        (root / "lists" / "val.txt").write_text("\n".join(lists["val"]) + "\n")


@pytest.mark.parametrize(("flags", "message"), [
    (["tset=lists/test.txt"], "--split-file tset=lists/test.txt: unknown role 'tset'; did you "
     "mean 'test'? roles: train_val, train, val, test"),
    (["test=lists/nope.txt"], "--split-file test=lists/nope.txt: not a file"),
    (["lists/test.txt"], "--split-file 'lists/test.txt': expected ROLE=PATH"),
    (["train=lists/train.txt", "test=lists/test.txt"],
     "with train or val set, set both (and optionally test), not train_val"),
    (["test=lists/test.txt", "test=lists/val.txt"], "--split-file test=: given twice"),
])
def test_bad_split_file_flags_are_usage_errors(
    run_cli: Callable[..., CliResult], listed_release: tuple[Path, dict[str, list[str]]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str,
) -> None:
    root, _ = listed_release
    monkeypatch.chdir(root)
    for verb in (["stats", "data"], ["prepare", "data", "--out", str(tmp_path / "c")]):
        result = run_cli("data", *verb, *[f"--split-file={f}" for f in flags])
        assert result.code == 2 and message in result.err, result.err
        assert not (tmp_path / "c").exists()
