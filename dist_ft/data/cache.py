"""The preprocessed cache: decode every image once, read training batches from memory maps.

Layout of a cache folder::

    index.npz          images, labels, split, patients, views, ages, sexes (row order)
    shard_00000.npy    uint8 [n, S, S]: rows 0 .. shard_size-1   (np.load(..., mmap_mode="r"))
    shard_00000.json   count, sha256, bytes, skipped images       (written after the .npy)
    settings.json      the cache's identity, written first (see below)
    manifest.json      everything above, summed up; written last
    missing_images.txt the listed images not found (only with on_bad_image=skip): they have
                       no row, so shards hold only the images found

Each shard is written to a temporary name and renamed when complete, then its ``.json``
appears: an interrupted ``prepare`` resumes with the shards that lack one. Readers never load
a shard into RAM; the OS pages in the rows a batch touches.

The identity (``settings.json``, repeated in the manifest) is what the shards depend on: the
data root, the sha256 of each metadata and list file read, image and shard size, split
settings, and the cache and dist-ft versions. ``prepare`` reuses shards only under the same
identity; any difference is refused (or, with ``rebuild``, the old cache files are removed
first), so a cache never mixes images of one dataset with labels of another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft import __version__
from dist_ft.config.schema import SplitFilesConfig
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import IMAGE_FOLDERS, ImageError, load_gray_resized, locate_images
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import (
    EXCLUDED,
    SPLIT_NAMES,
    TEST_LIST,
    TRAIN_VAL_LIST,
    list_files,
    resolve_splits,
)
from dist_ft.data.table import detect_format

CACHE_VERSION = 1
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


def _refuse_other_formats(root: Path) -> None:
    """Refuse an ImageFolder tree or a CSV file with the reason, before a metadata error.

    The cache stores what ``format: chestxray14`` trains on: one grey channel and the 14
    findings as multi-hot rows, indexed by the metadata's image names. ImageFolder and CSV
    data train in RGB on their own classes, and the recipe schema refuses ``data.cache`` for
    them, so a cache of theirs could not be used; training reads their files directly.
    """
    fmt = detect_format(root)
    if fmt is None or fmt == "chestxray14":
        return
    what = "a CSV file" if fmt == "csv" else "an ImageFolder tree"
    raise CacheError(
        f"{root} is {what} (data.format: {fmt}); the preprocessed cache is for ChestX-ray14 "
        "folders only: it stores grey images with the 14 findings, and a recipe with format: "
        f"{fmt} cannot use data.cache (training reads its image files directly, in colour). "
        f"Nothing to prepare; to check its images before training run: dist-ft data stats "
        f"{root} --check-images"
        + (" --data csv.label_column=COLUMN" if fmt == "csv" else "")
    )


@dataclass(frozen=True)
class _ShardJob:
    out: str
    shard: int
    paths: list[str | None]
    names: list[str]
    size: int
    skip_bad: bool


def _write_shard(job: _ShardJob) -> dict[str, Any]:
    """Decode, resize and store one shard; returns its record (also written as .json)."""
    out = Path(job.out)
    final = out / f"{_shard_name(job.shard)}.npy"
    tmp = out / f"{_shard_name(job.shard)}.npy.tmp"
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(job.paths), job.size, job.size)
    )
    skipped = []
    for i, (path, name) in enumerate(zip(job.paths, job.names, strict=True)):
        try:
            if path is None:
                raise ImageError(f"{name}: image file not found under the data root")
            arr[i] = load_gray_resized(path, job.size)
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
) -> dict[str, Any]:
    """Build (or finish) the cache of a ChestX-ray14 folder.

    Args:
        root: the data folder (metadata CSV, image folders, optional list files).
        out: the cache folder.
        size: side of the stored square images.
        shard_size: images per shard file.
        workers: decoding processes.
        on_bad_image: ``error`` (stop, naming the image) or ``skip``: an image not found gets
            no row (shards hold only the rows kept), an unreadable one is stored as zeros and
            its row marked invalid; both are recorded in the manifest's ``skipped``.
        val_fraction, test_fraction, split_seed: the split settings (see ``splits.py``).
        progress: show progress with rate and ETA on stderr (a bar on a terminal, else a
            line per 10 % or per minute; see :func:`dist_ft.console.progress`).
        on_shard: called with each finished shard's index (tests use it to interrupt).
        rebuild: when ``out`` holds a cache of another identity, remove its files (only
            those ``prepare`` writes) and start over instead of refusing.
        split_files: ``data.split_files`` (list files anywhere), recorded with their sha256.

    Returns:
        The manifest.

    Raises:
        CacheError: ``out`` holds a cache of another identity (data root, metadata or list
            files, sizes, split settings, versions) and ``rebuild`` is off; names each
            difference. Also ``root`` being an ImageFolder tree or a CSV file (the cache
            serves ``format: chestxray14`` only), saying why.
        ImageError: a bad image with ``on_bad_image='error'``, or no image found at all; a
            missing one names the folders searched.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    root, out = Path(root), Path(out)
    _refuse_other_formats(root)
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
    if out.is_dir():
        _check_identity(out, settings, rebuild)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / SETTINGS
    if not settings_path.exists():
        _atomic_write_text(settings_path, json.dumps(settings, indent=2))
    index_tmp = out / "index.tmp.npz"
    np.savez(
        index_tmp,
        images=np.array(meta.images, dtype=str),
        labels=meta.labels,
        split=split,
        patients=meta.patients,
        views=np.array(meta.views, dtype=str),
        ages=meta.ages,
        sexes=np.array(meta.sexes, dtype=str),
    )
    index_tmp.replace(out / INDEX)

    shards = range(0, len(meta), shard_size)
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
        stop = min(start + shard_size, len(meta))
        jobs.append(_ShardJob(str(out), k, paths[start:stop], list(meta.images[start:stop]),
                              size, on_bad_image == "skip"))

    from dist_ft.console import progress as show_progress

    bar = show_progress(total=len(meta), initial=sum(r["count"] for r in records.values()),
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
    skipped = [s for r in ordered for s in r["skipped"]]
    valid = np.ones(len(meta), dtype=bool)
    skipped_names = {s["image"] for s in skipped}
    if skipped_names:
        valid = np.array([n not in skipped_names for n in meta.images])
    np.save(out / "valid.npy", valid)
    manifest = {
        **settings,
        "findings": list(FINDINGS),
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
        if self.manifest.get("version") != CACHE_VERSION:
            raise CacheError(f"{manifest_path}: cache version {self.manifest.get('version')}, "
                             f"this dist-ft reads version {CACHE_VERSION}")
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
            self.views = index["views"]
            # Caches made before ages and sexes were indexed lack them (sample_info omits them).
            self.ages = index["ages"] if "ages" in index.files else None
            self.sexes = index["sexes"] if "sexes" in index.files else None
        self.valid = np.load(self.path / "valid.npy")
        self.size = int(self.manifest["size"])
        self.shard_size = int(self.manifest["shard_size"])
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.images)

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
        """The uint8 ``[S, S]`` image of ``row`` (a view into the memory map)."""
        shard, offset = divmod(int(row), self.shard_size)
        return self._shard(shard)[offset]

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The uint8 ``[n, S, S]`` images of ``rows`` (in that order), copied out of the maps.

        Rows are copied in ascending order, so a batch walks each shard's pages front to back
        (what the OS read-ahead serves best), each straight to its position in ``out`` (uint8
        ``[n, S, S]``, allocated when not given): one copy per image, where a fancy index
        (gather, then scatter back to the asked order) makes two.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), self.size, self.size), dtype=np.uint8)
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
