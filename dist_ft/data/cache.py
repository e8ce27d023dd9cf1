"""The preprocessed cache: decode every image once, read training batches from memory maps.

It serves ``format: chestxray14`` (grey, the 14 findings), ``imagefolder`` (RGB, one class
per image) and ``csv`` (RGB, multi-hot rows): the rows, labels and splits are those training
reads from the files (for ImageFolder and CSV, through the very dataset builders training
uses), and each image is what the file dataset decodes at ``load_size == size``.

Layout of a cache folder::

    index.npz          images, labels, split, patients (the image id where unknown), and for
                       ChestX-ray14 views, ages, sexes (row order)
    shard_00000.npy    uint8 [n, S, S] (grey) or [n, 3, S, S] (RGB): rows 0 .. shard_size-1
                       (np.load(..., mmap_mode="r"))
    shard_00000.json   count, sha256, bytes, skipped images       (written after the .npy)
    settings.json      the cache's identity, written first (see below)
    manifest.json      everything above, summed up; written last
    missing_images.txt the listed images not found (only with on_bad_image=skip): they have
                       no row, so shards hold only the images found

Each shard is written to a temporary name and renamed when complete, then its ``.json``
appears: an interrupted ``prepare`` resumes with the shards that lack one. Readers never load
a shard into RAM; the OS pages in the rows a batch touches.

The identity (``settings.json``, repeated in the manifest) is what the shards depend on: the
format, the data root, the sha256 of each metadata, CSV and list file read, image and shard
size, split settings, for CSV its column settings, for ImageFolder and CSV the digest of the
image file list (paths and sizes), and the cache and dist-ft versions. The manifest also
records ``classes``, ``multilabel`` and ``channels``: a reader needs nothing else.
``prepare`` reuses shards only under the same identity; any difference is refused (or,
with ``rebuild``, the old cache files are removed first), so a cache never mixes images of
one dataset with labels of another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft import __version__
from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import DataConfig, SplitFilesConfig
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import (
    IMAGE_FOLDERS,
    ImageError,
    load_gray_resized,
    load_rgb_resized,
    locate_images,
)
from dist_ft.data.metadata import MetadataError, find_metadata, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    SPLIT_NAMES,
    TEST_LIST,
    TRAIN_VAL_LIST,
    list_files,
    resolve_splits,
)
from dist_ft.data.table import detect_format

# 2: format, classes, multilabel and channels recorded (ImageFolder and CSV caches). A
# version 1 cache (ChestX-ray14 only, laid out as a version 2 one) is still read.
CACHE_VERSION = 2
READABLE_VERSIONS = (1, 2)
CACHE_FORMATS = ("chestxray14", "imagefolder", "csv")  # data.format values a cache serves
MANIFEST = "manifest.json"
INDEX = "index.npz"
SETTINGS = "settings.json"
MISSING = "missing_images.txt"  # listed images not found (prepare with on_bad_image=skip)
# Every file name prepare writes: what --rebuild may remove, nothing else.
_OWN_FILES = (MANIFEST, INDEX, "index.tmp.npz", "valid.npy", "shard_*.npy", "shard_*.json",
              "shard_*.npy.tmp", "shard_*.json.tmp", "manifest.json.tmp", "settings.json.tmp",
              MISSING, f"{MISSING}.tmp")


class CacheError(RuntimeError):
    """A cache is incomplete, corrupt or was made with other settings; names the file."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _identity_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: <cache's value> in the cache, <new value> now`` for every differing field."""
    a, b = _flatten(old), _flatten(new)

    def show(value: Any, key: str) -> str:
        # A digest prefix is enough to tell two files apart in a message.
        digest = key.startswith("sha256.") and isinstance(value, str) and len(value) == 64
        return f"{value[:12]}..." if digest else str(value)

    return [f"{k}: {show(a.get(k, '(not recorded)'), k)} in the cache, "
            f"{show(b.get(k, '(absent)'), k)} now"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _clear_cache(out: Path) -> None:
    # The manifest goes first (a reader stops trusting the folder) and settings.json last: a
    # rebuild interrupted half-way still refuses to reuse what is left without --rebuild.
    (out / MANIFEST).unlink(missing_ok=True)
    for pattern in _OWN_FILES:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    (out / SETTINGS).unlink(missing_ok=True)


def _check_identity(out: Path, settings: dict[str, Any], rebuild: bool) -> None:
    """Refuse (or with ``rebuild`` clear) a cache folder holding another identity's files."""
    settings_path = out / SETTINGS
    if settings_path.is_file():
        try:
            old = json.loads(settings_path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            old = {SETTINGS: "unreadable"}
        changes = _identity_changes(old, settings) if old != settings else []
    elif any(any(out.glob(p)) for p in _OWN_FILES):
        changes = [f"{SETTINGS}: missing beside existing cache files (unknown data)"]
    else:
        changes = []
    if not changes:
        return
    if rebuild:
        _clear_cache(out)
        return
    raise CacheError(
        f"{out} holds a cache of other data or settings ({'; '.join(changes)}); its shards "
        "cannot be reused (images would get other images' labels or sizes). Pass --rebuild "
        "to replace it, or pick another --out"
    )


def _split_files_record(split_files: SplitFilesConfig | None) -> dict[str, Any] | None:
    """``data.split_files`` as the cache records it: each role's absolute path and sha256."""
    if split_files is None:
        return None
    return {role: {"path": str(path.resolve()), "sha256": _sha256(path)}
            for role, path in list_files(None, split_files).items()}


def _split_settings(root: Path, val_fraction: float, test_fraction: float,
                    seed: int, split_files: SplitFilesConfig | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
        # With the official test list, test_fraction is unused (see resolve_splits).
        "test_list": (root / TEST_LIST).is_file() if split_files is None
        else split_files.test is not None,
    }
    if split_files is not None:  # absent otherwise, so caches made before it stay valid
        settings["split_files"] = _split_files_record(split_files)
    return settings


def _files_digest(paths: list[Path], split: np.ndarray, root: Path) -> dict[str, Any]:
    """Count and sha256 of the rows' split, image path (relative to ``root`` where inside it)
    and file size, in row order: an image added, removed, moved or replaced changes it."""
    digest = hashlib.sha256()
    for path, part in zip(paths, split.tolist(), strict=True):
        try:
            name = path.resolve().relative_to(root).as_posix()
        except ValueError:  # a CSV may name images outside data.root by absolute path
            name = str(path.resolve())
        size = path.stat().st_size if path.is_file() else -1
        digest.update(f"{SPLIT_NAMES[part]}\t{name}\t{size}\n".encode())
    return {"count": len(paths), "sha256": digest.hexdigest()}


# sample_info keys -> index.npz arrays (the names ChestX-ray14 caches have always used).
_INDEX_NAMES = {"view": "views", "sex": "sexes", "age": "ages"}


@dataclass(frozen=True)
class _FileRows:
    """The rows of an ImageFolder tree or a CSV file, as training's datasets list them."""

    paths: list[Path]
    index: dict[str, np.ndarray]  # images, labels, split, patients (+ views, sexes, ages)
    classes: list[str]
    multilabel: bool
    patients_known: bool


def _file_rows(cfg: DataConfig) -> _FileRows:
    """Every split of an ImageFolder or CSV recipe, through training's dataset builders.

    Reusing the builders (not a copy of their rules) keeps the cache's rows, labels, class
    order and splits identical to what training reads from the files.

    Raises:
        MetadataError: no ``train/`` folder, a split folder whose classes differ from
            train's, a class folder without images, or what the CSV reader refuses.
    """
    from dist_ft.data.datasets import split_datasets  # imports torch; datasets imports us

    sets, problems = split_datasets(cfg)
    classes = list(sets["train"].classes)
    if problems:
        raise MetadataError(f"{cfg.root}: {problems[0]} (dist-ft data stats shows the counts)")
    parts = list(sets.values())
    info_keys = [k for k in parts[0].sample_info if all(k in ds.sample_info for ds in parts)]
    info = {k: np.concatenate([np.asarray(ds.sample_info[k]) for ds in parts])
            for k in info_keys}
    index = {
        "images": info.pop("image").astype(str),
        "labels": np.concatenate([np.asarray(ds.targets) for ds in parts]),
        "split": np.concatenate([np.full(len(ds), SPLIT_NAMES.index(split), dtype=np.int8)
                                 for split, ds in sets.items()]),
        "patients": info.pop("patient").astype(str),
        **{_INDEX_NAMES[k]: v for k, v in info.items()},
    }
    patients_known = cfg.format == "csv" and cfg.csv is not None \
        and cfg.csv.patient_column is not None
    return _FileRows([Path(p) for ds in parts for p in ds.paths], index, classes,
                     bool(parts[0].multilabel), patients_known)


def _csv_record(cfg: DataConfig) -> dict[str, Any] | None:
    """``data.csv`` as a cache records and compares it: the file's absolute path, columns."""
    if cfg.csv is None:
        return None
    return {**cfg.csv.model_dump(), "file": str(Path(cfg.csv.file).resolve())}


def _csv_split_settings(cfg: DataConfig) -> dict[str, Any]:
    """The split settings a CSV's rows were split with (only the column, if it has one)."""
    assert cfg.csv is not None  # guaranteed by DataConfig
    if cfg.csv.split_column is not None:
        return {"column": cfg.csv.split_column}
    settings = {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
                "seed": cfg.split_seed,
                "test_list": cfg.split_files is not None and cfg.split_files.test is not None}
    if cfg.split_files is not None:
        settings["split_files"] = _split_files_record(cfg.split_files)
    return settings


@dataclass(frozen=True)
class _ShardJob:
    out: str
    shard: int
    paths: list[str | None]
    names: list[str]
    size: int
    skip_bad: bool
    channels: int = 1  # 1: grey [n, S, S]; 3: RGB stored channels first, [n, 3, S, S]


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Decode, resize and store one shard; returns its record (also written as .json)."""
    out = Path(job.out)
    final = out / f"{_shard_name(job.shard)}.npy"
    tmp = out / f"{_shard_name(job.shard)}.npy.tmp"
    side = (job.size, job.size) if job.channels == 1 else (3, job.size, job.size)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(job.paths), *side))
    skipped = []
    for i, (path, name) in enumerate(zip(job.paths, job.names, strict=True)):
        try:
            if path is None:
                raise ImageError(f"{name}: image file not found under the data root")
            arr[i] = (load_gray_resized(path, job.size) if job.channels == 1
                      else load_rgb_resized(path, job.size).transpose(2, 0, 1))
        except ImageError as exc:
            if not job.skip_bad:
                del arr
                tmp.unlink(missing_ok=True)  # a shard stopped by a bad image leaves no file
                raise
            arr[i] = 0
            skipped.append({"image": name, "reason": str(exc)})
    arr.flush()
    del arr
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(final)
    record = {
        "file": final.name,
        "count": len(job.paths),
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "skipped": skipped,
    }
    _atomic_write_text(out / f"{_shard_name(job.shard)}.json", json.dumps(record))
    return record


def prepare_cache(
    root: str | Path,
    out: str | Path,
    size: int = 256,
    shard_size: int = 1024,
    workers: int = 1,
    on_bad_image: str = "error",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    rebuild: bool = False,
    split_files: SplitFilesConfig | None = None,
    fmt: str = "auto",
    data: Sequence[str] = (),
) -> dict[str, Any]:
    """Build (or finish) the cache of a ChestX-ray14 folder, ImageFolder tree or CSV file.

    Args:
        root: the data folder (ChestX-ray14: metadata CSV, image folders, optional list
            files; ImageFolder: ``train/``, ``val/`` or ``valid/``, ``test/``), or the CSV file.
        out: the cache folder.
        size: side of the stored square images: the pixels the files give at
            ``data.load_size`` equal to it (a cache's images come at this size).
        shard_size: images per shard file.
        workers: decoding processes.
        on_bad_image: ``error`` (stop, naming the image) or ``skip``: an image not found gets
            no row (shards hold only the rows kept; named in ``missing_images.txt`` and
            counted in the manifest's ``missing_images``), an unreadable one is stored as
            zeros and its row marked invalid (the manifest's ``skipped``).
        val_fraction, test_fraction, split_seed: the split settings (see ``splits.py``).
        progress: show progress with rate and ETA on stderr (a bar on a terminal, else a
            line per 10 % or per minute; see :func:`dist_ft.console.progress`).
        on_shard: called with each finished shard's index (tests use it to interrupt).
        rebuild: when ``out`` holds a cache of another identity, remove its files (only
            those ``prepare`` writes) and start over instead of refusing.
        split_files: ``data.split_files`` (list files anywhere), recorded with their sha256.
        fmt: ``chestxray14``, ``imagefolder``, ``csv``, or ``auto`` (told by the layout).
        data: ``KEY=VALUE`` recipe ``data.*`` settings for ImageFolder and CSV (the CSV's
            columns: ``csv.label_column=labels``), as ``dist-ft data stats --data`` takes.

    Returns:
        The manifest.

    Raises:
        CacheError: ``out`` holds a cache of another identity (format, data root, metadata,
            CSV or list files, the image files, column settings, sizes, split settings,
            versions) and ``rebuild`` is off; names each difference. Also a format the cache
            does not serve (CheXpert, MIMIC-CXR-JPG).
        ConfigError: a ``data`` setting the recipe schema refuses, naming the key.
        MetadataError: what training's readers refuse (bad CSV, ImageFolder split folders
            with other classes than train's, ...).
        ImageError: a bad image with ``on_bad_image='error'``, or no image found at all; a
            missing one names the folders searched.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    root, out = Path(root), Path(out)
    if fmt == "auto":  # an unknown layout gets ChestX-ray14's message: which file is missing
        fmt = detect_format(root) or "chestxray14"
    if fmt not in CACHE_FORMATS:
        raise CacheError(f"format {fmt}: the cache serves {', '.join(CACHE_FORMATS)}; "
                         f"training reads {fmt} images from their files")
    if fmt != "chestxray14":
        from dist_ft.data.stats import data_config

        cfg = data_config(root, fmt, data, val_fraction, test_fraction, split_seed,
                          split_files)
        if on_bad_image == "skip":  # the flag, or --data on_bad_image=skip
            cfg = cfg.model_copy(update={"on_bad_image": "skip"})
        return _prepare_files(cfg, out, size, shard_size, workers, progress, on_shard,
                              rebuild)
    if data:
        raise ConfigError([f"--data {data[0]}: ChestX-ray14 folders take no data settings "
                           "beyond the split flags"])
    meta_path = find_metadata(root)
    meta = read_metadata(meta_path)
    split = resolve_splits(meta, root, val_fraction, test_fraction, split_seed, split_files)
    keep = split != EXCLUDED
    meta, split = meta.subset(keep), split[keep]
    located = locate_images(root)
    have = np.fromiter((n in located.paths for n in meta.images), dtype=bool, count=len(meta))
    missing = [str(n) for n in meta.images[~have]]
    if missing and (on_bad_image == "error" or not have.any()):
        none = "none of them is there" if not have.any() else "use on_bad_image=skip " \
            "(dist-ft data prepare --on-bad-image skip) to cache the rest"
        raise ImageError(
            f"{len(missing):,} image(s) of the {len(meta):,} listed in {meta_path} are not "
            f"under {root}, first {missing[0]!r} ({located.looked_in()}); {none}"
        )
    listed = len(meta)
    # A row without an image file gets no row in the index and no place in a shard: a
    # prepare of 2 images listed among 112,120 writes 2 images, not 112,120 zeroed ones.
    meta, split = meta.subset(have), split[have]
    paths: list[str | None] = [str(located.paths[n]) for n in meta.images]
    # The files whose content decides rows, labels and splits: the ones actually read.
    sources = [meta_path] + ([root / n for n in (TEST_LIST, TRAIN_VAL_LIST)
                              if (root / n).is_file()] if split_files is None else [])
    settings = {
        "version": CACHE_VERSION,
        "dist_ft_version": __version__,
        "format": "chestxray14",
        "root": str(root.resolve()),
        "size": size,
        "shard_size": shard_size,
        "num_images": listed,
        "metadata": meta_path.name,
        "sha256": {p.name: _sha256(p) for p in sources},
        "split": _split_settings(root, val_fraction, test_fraction, split_seed, split_files),
    }
    if missing:  # absent otherwise, so caches made before it stay valid
        # Which rows the shards hold: adding images later changes them (so --rebuild).
        settings["missing_images"] = {
            "count": len(missing),
            "sha256": hashlib.sha256("\n".join(missing).encode()).hexdigest(),
        }
    index = {"images": np.array(meta.images, dtype=str), "labels": meta.labels,
             "split": split, "patients": meta.patients,
             "views": np.array(meta.views, dtype=str), "ages": meta.ages,
             "sexes": np.array(meta.sexes, dtype=str)}
    ordered, valid = _write_cache(out, settings, index, paths, list(index["images"]), size,
                                  shard_size, workers, on_bad_image == "skip", 1, progress,
                                  on_shard, rebuild)
    skipped = [s for r in ordered for s in r["skipped"]]
    manifest = {
        **settings,
        "findings": list(FINDINGS),
        **_reading(list(FINDINGS), True, 1, True),
        "num_rows": len(meta),
        "num_valid": int(valid.sum()),
        "splits": {name: int(((split == i) & valid).sum()) for i, name in enumerate(SPLIT_NAMES)},
        "shards": ordered,
        "skipped": skipped,
        "bytes": sum(r["bytes"] for r in ordered),
    }
    if missing:
        # One name a line in a file of its own: 112,118 JSON records would bloat the manifest.
        _atomic_write_text(out / MISSING, "\n".join(missing) + "\n")
        manifest["missing_images"] = {
            **settings["missing_images"], "file": MISSING, "first": missing[:5],
            "looked_in": list(IMAGE_FOLDERS), "found_in": located.folders,
        }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _reading(classes: list[str], multilabel: bool, channels: int,
             patients_known: bool) -> dict[str, Any]:
    """What a reader needs beyond the rows: the manifest's dataset description."""
    return {"classes": classes, "multilabel": multilabel, "channels": channels,
            "patients_known": patients_known}


def _prepare_files(cfg: DataConfig, out: Path, size: int, shard_size: int, workers: int,
                   progress: bool, on_shard: Callable[[int], None] | None,
                   rebuild: bool) -> dict[str, Any]:
    """:func:`prepare_cache` of an ImageFolder tree or CSV file (RGB, training's rows)."""
    rows = _file_rows(cfg)
    images_root = Path(cfg.root) if cfg.root else Path(cfg.csv.file).parent  # type: ignore
    images_root = images_root.resolve()
    split = rows.index["split"]
    settings: dict[str, Any] = {
        "version": CACHE_VERSION,
        "dist_ft_version": __version__,
        "format": cfg.format,
        "root": str(images_root),
        "size": size,
        "shard_size": shard_size,
        "num_images": len(rows.paths),
        "files": _files_digest(rows.paths, split, images_root),
    }
    if cfg.format == "csv":
        csv_file = Path(cfg.csv.file)  # type: ignore[union-attr]  # set with format: csv
        settings["csv"] = _csv_record(cfg)
        settings["sha256"] = {csv_file.name: _sha256(csv_file)}
        settings["split"] = _csv_split_settings(cfg)
    paths = [str(p) for p in rows.paths]
    # Bad images are named by path: ImageFolder ids (class/file) repeat across splits.
    ordered, valid = _write_cache(out, settings, rows.index, list(paths), paths, size,
                                  shard_size, workers, cfg.on_bad_image == "skip", 3, progress,
                                  on_shard, rebuild)
    manifest = {
        **settings,
        **_reading(rows.classes, rows.multilabel, 3, rows.patients_known),
        "num_rows": len(rows.paths),
        "num_valid": int(valid.sum()),
        "splits": {name: int(((split == i) & valid).sum()) for i, name in enumerate(SPLIT_NAMES)},
        "shards": ordered,
        "skipped": [s for r in ordered for s in r["skipped"]],
        "bytes": sum(r["bytes"] for r in ordered),
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _write_cache(out: Path, settings: dict[str, Any], index: dict[str, np.ndarray],
                 paths: list[str | None], names: list[str], size: int, shard_size: int,
                 workers: int,
                 skip_bad: bool, channels: int, progress: bool,
                 on_shard: Callable[[int], None] | None,
                 rebuild: bool) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Settings, index and the shards not yet done (resuming); returns the shard records
    in order and which rows hold a readable image (also saved as ``valid.npy``).

    ``names`` identify the rows' images in messages and the manifest's ``skipped``.
    """
    if out.is_dir():
        _check_identity(out, settings, rebuild)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / SETTINGS
    if not settings_path.exists():
        _atomic_write_text(settings_path, json.dumps(settings, indent=2))
    index_tmp = out / "index.tmp.npz"
    np.savez(index_tmp, **index)
    index_tmp.replace(out / INDEX)

    shards = range(0, len(paths), shard_size)
    jobs = []
    records: dict[int, dict[str, Any]] = {}
    for k, start in enumerate(shards):
        done = out / f"{_shard_name(k)}.json"
        npy = out / f"{_shard_name(k)}.npy"
        if done.is_file() and npy.is_file():
            record = json.loads(done.read_text())
            if record.get("bytes") == npy.stat().st_size:
                records[k] = record
                continue
        stop = min(start + shard_size, len(paths))
        jobs.append(_ShardJob(str(out), k, paths[start:stop],
                              [str(n) for n in names[start:stop]], size, skip_bad, channels))

    from dist_ft.console import progress as show_progress

    bar = show_progress(total=len(paths), initial=sum(r["count"] for r in records.values()),
                        unit="img", desc="prepare", enabled=progress, smoothing=0.1)
    try:
        if workers <= 1:
            for job in jobs:
                records[job.shard] = _write_shard(job)
                bar.update(len(job.paths))
                if on_shard:
                    on_shard(job.shard)
        else:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(_write_shard, job): job for job in jobs}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        job = futures[fut]
                        records[job.shard] = fut.result()  # re-raises a worker's ImageError
                        bar.update(len(job.paths))
                        if on_shard:
                            on_shard(job.shard)
    finally:
        bar.close()

    ordered = [records[k] for k in range(len(shards))]
    valid = np.ones(len(paths), dtype=bool)
    bad = {s["image"] for r in ordered for s in r["skipped"]}
    if bad:
        valid = np.array([str(n) not in bad for n in names])
    np.save(out / "valid.npy", valid)
    return ordered, valid


class CacheReader:
    """Random access to a finished cache through per-process memory maps.

    Args:
        path: the cache folder.
        verify: also compare every shard's sha256 with the manifest (reads all data once).

    Raises:
        CacheError: no manifest (unfinished ``prepare``), a shard missing or of the wrong size,
            or (with ``verify``) a checksum mismatch; the message names the shard.
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(
                f"{self.path}: no {MANIFEST}; the cache is unfinished or not a cache "
                "(run dist-ft data prepare again: it resumes)"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("version") not in READABLE_VERSIONS:
            raise CacheError(
                f"{manifest_path}: cache version {self.manifest.get('version')}, this dist-ft "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; re-run dist-ft data "
                f"prepare ... --out {self.path} --rebuild")
        # Version 1 caches are ChestX-ray14's: grey, the 14 findings, patients known.
        self.format: str = self.manifest.get("format", "chestxray14")
        self.classes: list[str] = list(self.manifest.get("classes", FINDINGS))
        self.multilabel: bool = bool(self.manifest.get("multilabel", True))
        self.channels: int = int(self.manifest.get("channels", 1))
        self.patients_known: bool = bool(self.manifest.get("patients_known", True))
        for record in self.manifest["shards"]:
            shard = self.path / record["file"]
            if not shard.is_file():
                raise CacheError(f"{shard}: shard file is missing")
            if shard.stat().st_size != record["bytes"]:
                raise CacheError(f"{shard}: {shard.stat().st_size} bytes, manifest says "
                                 f"{record['bytes']} (truncated or replaced)")
            if verify and _sha256(shard) != record["sha256"]:
                raise CacheError(f"{shard}: checksum mismatch with {MANIFEST}")
        with np.load(self.path / INDEX) as index:
            self.images = index["images"]
            self.labels = index["labels"]
            self.split = index["split"]
            self.patients = index["patients"]
            self.views = index["views"] if "views" in index.files else None
            # Caches made before ages and sexes were indexed lack them (sample_info omits them).
            self.ages = index["ages"] if "ages" in index.files else None
            self.sexes = index["sexes"] if "sexes" in index.files else None
        self.valid = np.load(self.path / "valid.npy")
        self.size = int(self.manifest["size"])
        self.shard_size = int(self.manifest["shard_size"])
        # One image's array: grey [S, S], RGB channels first [3, S, S].
        self.shape: tuple[int, ...] = ((self.size, self.size) if self.channels == 1
                                       else (self.channels, self.size, self.size))
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.images)

    def check_recipe(self, cfg: DataConfig) -> None:
        """Refuse a recipe ``data`` section this cache was not prepared for.

        Checks the format, for CSV the column settings, and the split settings where they
        decide the splits (ChestX-ray14; CSV without ``csv.split_column``); ImageFolder
        splits are its folders.

        Raises:
            CacheError: naming the differing ``data.*`` keys and how to fix them.
        """
        fix = (f"rebuild the cache with the recipe's settings (dist-ft data prepare ... --out "
               f"{self.path} --rebuild) or point data.cache at a matching cache")
        if cfg.format != self.format:
            raise CacheError(f"data.cache {self.path} holds {self.format} data but data.format "
                             f"is {cfg.format}; {fix}")
        if self.format == "chestxray14":
            self.check_split(cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                             cfg.split_files)
            return
        if self.format != "csv":
            return
        cached, now = self.manifest.get("csv") or {}, _csv_record(cfg) or {}
        differ = [f"data.csv.{k} is {now.get(k)!r} in the recipe but {cached.get(k)!r} in "
                  "the cache" for k in sorted(set(cached) | set(now))
                  if cached.get(k) != now.get(k)]
        if differ:
            raise CacheError(f"data.cache {self.path} was prepared from other CSV settings: "
                             f"{'; '.join(differ)}; {fix}")
        if cfg.csv is not None and cfg.csv.split_column is None:
            self.check_split(cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                             cfg.split_files)

    def check_split(self, val_fraction: float, test_fraction: float, seed: int,
                    split_files: SplitFilesConfig | None = None) -> None:
        """Refuse a recipe whose split settings differ from those the cache was split with.

        The cache stores each row's split; training with ``data.val_fraction: 0.3`` on a cache
        split at 0.1, other ``data.split_files``, or list files edited since ``prepare`` would
        silently train and validate on other images than the recipe says.

        Raises:
            CacheError: naming each differing ``data.*`` key with both values, and the fixes.
        """
        split = self.manifest.get("split") or {}
        keys = [("val_fraction", "data.val_fraction", "--val-fraction", val_fraction),
                ("seed", "data.split_seed", "--split-seed", seed)]
        if not split.get("test_list"):  # with the official test list it is unused
            keys.append(("test_fraction", "data.test_fraction", "--test-fraction",
                         test_fraction))
        differ = [(key, flag, split.get(name), value) for name, key, flag, value in keys
                  if split.get(name) != value]
        self._check_list_files(split.get("split_files"), split_files)
        if not differ:
            return
        root = self.manifest.get("root", "ROOT")
        found = "; ".join(f"{key} is {value} in the recipe but {cached} in the cache"
                          for key, _, cached, value in differ)
        flags = " ".join(f"{flag} {value}" for _, flag, _, value in differ)
        sets = " ".join(f"{key}={cached}" for key, _, cached, _ in differ)
        raise CacheError(
            f"data.cache {self.path} was split with other settings: {found}. Rebuild the "
            f"cache (dist-ft data prepare {root} --out {self.path} --rebuild {flags}) or set "
            f"{sets} in the recipe"
        )

    def _check_list_files(self, cached: dict[str, Any] | None,
                          split_files: SplitFilesConfig | None) -> None:
        """Refuse other list files than the cache's, or list files changed since prepare."""
        fix = (f"rebuild the cache with the recipe's split settings (dist-ft data prepare "
               f"... --out {self.path} --rebuild) or point data.cache at a matching cache")
        try:
            now = _split_files_record(split_files)
        except OSError as exc:
            raise CacheError(f"data.split_files: cannot read {exc.filename}") from None
        if now is None and cached is None:
            # Lists in the data root: they must still be the ones the cache was split with.
            root = Path(self.manifest.get("root", ""))
            recorded = self.manifest.get("sha256") or {}
            for name in (TEST_LIST, TRAIN_VAL_LIST):
                if name in recorded and (root / name).is_file() \
                        and _sha256(root / name) != recorded[name]:
                    raise CacheError(f"data.cache {self.path} was split with another "
                                     f"{root / name} (the file changed since); {fix}")
            return
        if now == cached:
            return
        def show(record: dict[str, Any] | None) -> str:
            if not record:
                return "none"
            return ", ".join(f"{role}={v['path']} (sha256 {v['sha256'][:12]}...)"
                             for role, v in sorted(record.items()))
        raise CacheError(f"data.cache {self.path} was split with other list files: "
                         f"data.split_files is {show(now)} in the recipe but {show(cached)} in "
                         f"the cache; {fix}")

    def rows(self, split: int | None = None) -> np.ndarray:
        """Indices of the valid rows, of one split if given."""
        mask = self.valid if split is None else self.valid & (self.split == split)
        return np.flatnonzero(mask)

    def image(self, row: int) -> np.ndarray:
        """The uint8 image of ``row``, ``[S, S]`` or ``[3, S, S]`` (a view into the map)."""
        shard, offset = divmod(int(row), self.shard_size)
        return self._shard(shard)[offset]

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The uint8 ``[n, *shape]`` images of ``rows`` (in order), copied out of the maps.

        Rows are copied in ascending order, so a batch walks each shard's pages front to back
        (what the OS read-ahead serves best), each straight to its position in ``out`` (uint8
        ``[n, *shape]``, allocated when not given): one copy per image, where a fancy index
        (gather, then scatter back to the asked order) makes two.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        for k in np.argsort(rows, kind="stable").tolist():
            shard, offset = divmod(int(rows[k]), self.shard_size)
            out[k] = self._shard(shard)[offset]
        return out

    def _shard(self, shard: int) -> np.ndarray:
        """The memory map of one shard, opened once per process."""
        if os.getpid() != self._pid:  # a forked loader worker opens its own maps
            self._maps, self._pid = {}, os.getpid()
        arr = self._maps.get(shard)
        if arr is None:
            file = self.path / f"{_shard_name(shard)}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheError(f"{file}: cannot read this cache shard ({exc}); run "
                                 "dist-ft data prepare again to rebuild it") from None
            self._maps[shard] = arr
        return arr
