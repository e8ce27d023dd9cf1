"""The preprocessed cache: decode every image once, read training batches from memory maps.

Layout of a cache folder::

    index.npz          images, labels, split, patients, valid  (one row per image, row order)
    shard_00000.npy    uint8 [n, S, S]: rows 0 .. shard_size-1   (np.load(..., mmap_mode="r"))
    shard_00000.json   count, sha256, bytes, skipped images       (written after the .npy)
    manifest.json      everything above, summed up; written last

Each shard is written to a temporary name and renamed when complete, then its ``.json``
appears: an interrupted ``prepare`` resumes with the shards that lack one. Readers never load
a shard into RAM; the OS pages in the rows a batch touches.
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

from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import ImageError, find_images, load_gray_resized
from dist_ft.data.metadata import find_metadata, read_metadata
from dist_ft.data.splits import EXCLUDED, SPLIT_NAMES, resolve_splits

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npz"


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
) -> dict[str, Any]:
    """Build (or finish) the cache of a ChestX-ray14 folder.

    Args:
        root: the data folder (metadata CSV, image folders, optional list files).
        out: the cache folder.
        size: side of the stored square images.
        shard_size: images per shard file.
        workers: decoding processes.
        on_bad_image: ``error`` (stop, naming the image) or ``skip`` (store zeros, mark the row
            invalid and record it in the manifest).
        val_fraction, test_fraction, split_seed: the split settings (see ``splits.py``).
        progress: show a progress bar with ETA.
        on_shard: called with each finished shard's index (tests use it to interrupt).

    Returns:
        The manifest.

    Raises:
        CacheError: ``out`` holds a cache made with other settings or sources.
        ImageError: a bad image with ``on_bad_image='error'``.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    root, out = Path(root), Path(out)
    meta_path = find_metadata(root)
    meta = read_metadata(meta_path)
    split = resolve_splits(meta, root, val_fraction, test_fraction, split_seed)
    keep = split != EXCLUDED
    meta, split = meta.subset(keep), split[keep]
    found = find_images(root)
    paths = [str(found[n]) if n in found else None for n in meta.images]
    missing = [n for n, p in zip(meta.images, paths, strict=True) if p is None]
    if missing and on_bad_image == "error":
        raise ImageError(
            f"{len(missing)} image(s) listed in {meta_path.name} are not under {root} "
            f"(images/ or images_*/images/), first {missing[0]!r}; "
            "use on_bad_image=skip to cache the rest"
        )
    settings = {
        "version": CACHE_VERSION,
        "size": size,
        "shard_size": shard_size,
        "num_images": len(meta),
        "metadata": meta_path.name,
        "split": {"val_fraction": val_fraction, "test_fraction": test_fraction,
                  "seed": split_seed},
    }
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise CacheError(
                f"{out} holds a cache made with other settings ({', '.join(changed)}); "
                "pick another --out or delete it"
            )
    else:
        _atomic_write_text(settings_path, json.dumps(settings, indent=2))
    index_tmp = out / "index.tmp.npz"
    np.savez(
        index_tmp,
        images=np.array(meta.images, dtype=str),
        labels=meta.labels,
        split=split,
        patients=meta.patients,
        views=np.array(meta.views, dtype=str),
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

    from tqdm import tqdm

    bar = tqdm(total=len(meta), initial=sum(r["count"] for r in records.values()),
               unit="img", desc="prepare", disable=not progress, smoothing=0.1)
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
        "num_valid": int(valid.sum()),
        "splits": {name: int(((split == i) & valid).sum()) for i, name in enumerate(SPLIT_NAMES)},
        "shards": ordered,
        "skipped": skipped,
        "bytes": sum(r["bytes"] for r in ordered),
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
        self.valid = np.load(self.path / "valid.npy")
        self.size = int(self.manifest["size"])
        self.shard_size = int(self.manifest["shard_size"])
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.images)

    def rows(self, split: int | None = None) -> np.ndarray:
        """Indices of the valid rows, of one split if given."""
        mask = self.valid if split is None else self.valid & (self.split == split)
        return np.flatnonzero(mask)

    def image(self, row: int) -> np.ndarray:
        """The uint8 ``[S, S]`` image of ``row`` (a view into the memory map)."""
        if os.getpid() != self._pid:  # a forked loader worker opens its own maps
            self._maps, self._pid = {}, os.getpid()
        shard, offset = divmod(int(row), self.shard_size)
        arr = self._maps.get(shard)
        if arr is None:
            file = self.path / f"{_shard_name(shard)}.npy"
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CacheError(f"{file}: cannot read this cache shard ({exc}); run "
                                 "dist-ft data prepare again to rebuild it") from None
            self._maps[shard] = arr
        return arr[offset]
