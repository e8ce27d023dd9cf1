"""torch Datasets for training: ChestX-ray14 from PNGs or the cache, ImageFolder, CSV.

Every dataset yields ``(image, target)``: ``image`` a square uint8 ``[C, L, L]`` tensor at the
load size (augmentation and normalisation run per batch, see ``transforms.py``), ``target`` a
float multi-hot vector (multi-label) or an int64 class index (single-label). Each carries
``classes``, ``multilabel``, ``channels`` and ``targets`` (all targets, for class weights).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_ft.config.schema import DataConfig
from dist_ft.data.cache import CacheReader
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import ImageError, find_images, load_gray_resized, load_rgb_resized
from dist_ft.data.metadata import MetadataError, find_metadata, read_metadata
from dist_ft.data.splits import SPLIT_NAMES, resolve_splits
from dist_ft.data.transforms import default_load_size

log = logging.getLogger(__name__)


# With on_bad_image=skip, how many unreadable images in a row may be replaced before giving up.
MAX_SUBSTITUTES = 16


class LabelledImages(Dataset):
    """Images on disk with their targets; decoded and resized to ``load_size`` on access.

    An image that cannot be read (missing, empty, truncated, undecodable) raises
    :class:`ImageError` naming it, or with ``on_bad_image="skip"`` is replaced by the next
    readable image of the split and recorded: a warning, and one JSON line in
    ``bad_image_log`` when set.
    """

    def __init__(self, paths: list[Path], targets: np.ndarray, classes: list[str],
                 multilabel: bool, channels: int, load_size: int,
                 on_bad_image: str = "error") -> None:
        self.paths, self.targets, self.classes = paths, targets, classes
        self.multilabel, self.channels, self.load_size = multilabel, channels, load_size
        self.on_bad_image = on_bad_image
        self.bad_image_log: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int) -> torch.Tensor:
        if self.channels == 1:
            return torch.from_numpy(load_gray_resized(self.paths[i], self.load_size)).unsqueeze(0)
        image = torch.from_numpy(load_rgb_resized(self.paths[i], self.load_size))
        return image.permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        for k in range(min(MAX_SUBSTITUTES, len(self.paths))):
            j = (i + k) % len(self.paths)
            try:
                return self._image(j), _target(self.targets[j], self.multilabel)
            except ImageError as exc:
                if self.on_bad_image != "skip":
                    raise
                self._record(exc, j, i)
        raise ImageError(f"{self.paths[i]} and the {MAX_SUBSTITUTES - 1} images after it are "
                         "unreadable: the data is damaged, not one file")

    def _record(self, exc: ImageError, bad: int, wanted: int) -> None:
        log.warning("skipped unreadable image (data.on_bad_image=skip): %s", exc)
        if self.bad_image_log is not None:
            line = json.dumps({"image": str(self.paths[bad]), "index": bad,
                               "reason": str(exc), "replaced_in_sample": wanted})
            with open(self.bad_image_log, "a", encoding="utf-8") as fh:  # O_APPEND: one line
                fh.write(line + "\n")


class CachedImages(Dataset):
    """Rows of a preprocessed cache (memory-mapped, one channel, the cache's size)."""

    def __init__(self, reader: CacheReader, rows: np.ndarray) -> None:
        self.reader, self.rows = reader, rows
        self.targets = reader.labels[rows]
        self.classes, self.multilabel, self.channels = list(FINDINGS), True, 1
        self.load_size = reader.size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.reader.image(self.rows[i]))).unsqueeze(0)
        return image, _target(self.targets[i], True)


def _target(value: np.ndarray, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return torch.from_numpy(np.asarray(value, dtype=np.float32))
    return torch.tensor(int(value), dtype=torch.int64)


def _split_index(split: str) -> int:
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    return SPLIT_NAMES.index(split)


def _require_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise MetadataError(f"data.root is required for format: {cfg.format}")
    root = Path(cfg.root)
    if not root.is_dir():
        raise MetadataError(f"data.root: {root} is not a folder")
    return root


FRONTAL_VIEWS = ("PA", "AP")


def wanted_views(cfg: DataConfig) -> list[str] | None:
    """The views to keep: ``data.views``, narrowed to PA/AP by ``data.frontal_only``."""
    views = cfg.views
    if cfg.frontal_only:
        views = [v for v in (views or FRONTAL_VIEWS) if v in FRONTAL_VIEWS]
    return views


def load_size(cfg: DataConfig) -> int:
    """The side images are loaded at: ``data.load_size`` or 256/224 of the input size."""
    return cfg.load_size or default_load_size(cfg.image_size)


def chestxray14_dataset(cfg: DataConfig, split: str) -> Dataset:
    """ChestX-ray14 rows of one split, from the cache when ``data.cache`` is set."""
    want = _split_index(split)
    if cfg.cache is not None:
        reader = CacheReader(cfg.cache)
        reader.check_split(cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        rows = reader.rows(want)
        views = wanted_views(cfg)
        if views is not None:
            with np.load(Path(cfg.cache) / "index.npz") as index:
                rows = rows[np.isin(index["views"][rows], views)]
        return CachedImages(reader, rows)
    root = _require_root(cfg)
    meta = read_metadata(find_metadata(root))
    splits = resolve_splits(meta, root, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    mask = splits == want
    views = wanted_views(cfg)
    if views is not None:
        mask &= np.isin(meta.views, views)
    meta = meta.subset(mask)
    found = find_images(root)
    missing = [n for n in meta.images if n not in found]
    if missing:
        if cfg.on_bad_image == "error":
            raise MetadataError(
                f"{len(missing)} {split} image(s) of {meta.source.name} are not under {root}, "
                f"first {missing[0]!r}; set data.on_bad_image=skip to train without them"
            )
        log.warning("%d %s images missing under %s (skipped), first %s",
                    len(missing), split, root, missing[0])
        meta = meta.subset(np.isin(meta.images, list(found)))
    paths = [found[n] for n in meta.images]
    return LabelledImages(paths, meta.labels, list(FINDINGS), True, 1, load_size(cfg),
                          cfg.on_bad_image)


def imagefolder_dataset(cfg: DataConfig, split: str) -> Dataset:
    """``ROOT/<split>/<class>/*`` single-label images (``val`` also found as ``valid``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = _require_root(cfg)
    names = {"train": ["train"], "val": ["val", "valid"], "test": ["test"]}[split]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise MetadataError(f"data.root: {root} has no {' or '.join(names)}/ folder")
    classes, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    paths = [Path(p) for p, _ in samples]
    targets = np.array([t for _, t in samples], dtype=np.int64)
    return LabelledImages(paths, targets, classes, False, 3, load_size(cfg), cfg.on_bad_image)


def csv_dataset(cfg: DataConfig, split: str) -> Dataset:
    """A multi-label CSV: a path column and label columns or a separated label column."""
    assert cfg.csv is not None  # guaranteed by DataConfig
    spec = cfg.csv
    root = Path(cfg.root) if cfg.root else Path(spec.file).parent
    path = Path(spec.file)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise MetadataError(f"data.csv.file: cannot read {path}: {exc.strerror}") from None
    header = list(rows[0]) if rows else []
    needed = [spec.path_column, *(spec.label_columns or []), *filter(None, [spec.label_column,
                                                                           spec.split_column])]
    missing = [c for c in needed if c not in header]
    if missing:
        raise MetadataError(f"{path}: missing column {', '.join(map(repr, missing))}; "
                            f"header is {', '.join(header)}")
    if spec.label_columns is not None:
        classes = spec.label_columns
        try:
            targets = np.array([[float(r[c]) for c in classes] for r in rows], dtype=np.float32)
        except ValueError as exc:
            raise MetadataError(f"{path}: label columns must hold 0/1 values ({exc})") from None
    else:
        label_lists = [
            [x.strip() for x in r[spec.label_column].split(spec.separator) if x.strip()]
            for r in rows
        ]
        classes = spec.classes or sorted({x for labels in label_lists for x in labels})
        index = {c: i for i, c in enumerate(classes)}
        targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
        for k, labels in enumerate(label_lists):
            for x in labels:
                if x not in index:
                    raise MetadataError(f"{path}:{k + 2}: unknown label {x!r}; classes: "
                                        f"{', '.join(classes)}")
                targets[k, index[x]] = 1
    if spec.split_column is not None:
        split_of = np.array([r[spec.split_column].strip() for r in rows])
        bad = sorted(set(split_of) - set(SPLIT_NAMES))
        if bad:
            raise MetadataError(f"{path}: {spec.split_column} must be train/val/test, got {bad}")
        mask = split_of == split
    else:
        order = np.random.default_rng(cfg.split_seed).permutation(len(rows))
        n_val, n_test = round(cfg.val_fraction * len(rows)), round(cfg.test_fraction * len(rows))
        part = np.zeros(len(rows), dtype=np.int8)
        part[order[:n_val]] = 1
        part[order[n_val : n_val + n_test]] = 2
        mask = part == _split_index(split)
    paths = [root / r[spec.path_column] for r, keep in zip(rows, mask, strict=True) if keep]
    return LabelledImages(paths, targets[mask], list(classes), True, 3, load_size(cfg),
                          cfg.on_bad_image)


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The dataset of ``split`` (``train``, ``val`` or ``test``) for a recipe's ``data``."""
    builders = {"chestxray14": chestxray14_dataset, "imagefolder": imagefolder_dataset,
                "csv": csv_dataset}
    return builders[cfg.format](cfg, split)
