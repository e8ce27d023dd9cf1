"""torch Datasets for training: ChestX-ray14, ImageFolder, CSV, CheXpert and MIMIC-CXR-JPG
from their files, and the first three also from a cache (``data.cache``, see ``cache.py``).

Every dataset yields ``(image, target)``: ``image`` a square uint8 ``[C, L, L]`` tensor at the
load size (augmentation and normalisation run per batch, see ``transforms.py``), ``target`` a
float multi-hot vector (multi-label; NaN marks an uncertain label left out under
``data.chexpert.uncertain: ignore``) or an int64 class index (single-label). Each carries
``classes``, ``multilabel``, ``channels``, ``targets`` (all targets, for class weights) and
``sample_info`` (per sample, in dataset order: ``image`` id, ``patient`` (the image id when
unknown), and where known ``view``, ``sex`` (M/F), ``age`` (years, NaN unknown)).

Building a split checks the whole source's splits first: a patient in two splits is an error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from dist_ft.config.schema import DataConfig
from dist_ft.data.cache import CacheReader
from dist_ft.data.chexpert import read_chexpert
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import ImageError, load_gray_resized, load_rgb_resized, locate_images
from dist_ft.data.label_map import CHEXPERT_FINDINGS, SHARED_CHESTXRAY14, as_chestxray14
from dist_ft.data.metadata import MetadataError, find_metadata, read_metadata
from dist_ft.data.mimic import read_mimic
from dist_ft.data.splits import (
    SPLIT_NAMES,
    assign_splits,
    check_patient_overlap,
    list_files,
    resolve_splits,
)
from dist_ft.data.table import SampleTable, read_csv_rows
from dist_ft.data.transforms import default_load_size

log = logging.getLogger(__name__)


# With on_bad_image=skip, how many unreadable images in a row may be replaced before giving up.
MAX_SUBSTITUTES = 16


class LabelledImages(Dataset):
    """Images on disk with their targets; decoded and resized to ``load_size`` on access.

    An image that cannot be read (missing, empty, truncated, undecodable) raises
    :class:`ImageError` naming it, or with ``on_bad_image="skip"`` is replaced by the next
    readable image of the split and recorded: a warning, and one JSON line in
    ``bad_image_log`` when set. ``sample_info`` defaults to the file names as image and
    patient ids.
    """

    def __init__(self, paths: Sequence[Path], targets: np.ndarray, classes: list[str],
                 multilabel: bool, channels: int, load_size: int,
                 on_bad_image: str = "error",
                 sample_info: dict[str, np.ndarray] | None = None) -> None:
        self.paths, self.targets, self.classes = list(paths), targets, classes
        self.multilabel, self.channels, self.load_size = multilabel, channels, load_size
        self.on_bad_image = on_bad_image
        self.bad_image_log: Path | None = None
        if sample_info is None:
            names = np.array([Path(p).name for p in self.paths], dtype=str)
            sample_info = {"image": names, "patient": names}
        self.sample_info = sample_info

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
    """Rows of a preprocessed cache (memory-mapped, at the cache's size).

    Yields what the file dataset of the cache's format yields (see :class:`LabelledImages`):
    its classes, targets, channels (1 for ChestX-ray14, 3 for ImageFolder and CSV) and
    ``sample_info``.
    """

    def __init__(self, reader: CacheReader, rows: np.ndarray) -> None:
        self.reader, self.rows = reader, rows
        self.targets = reader.labels[rows]
        self.classes, self.multilabel = list(reader.classes), reader.multilabel
        self.channels = reader.channels
        self.load_size = reader.size
        self.sample_info = {"image": reader.images[rows].astype(str),
                            "patient": reader.patients[rows].astype(str)}
        if reader.views is not None:
            self.sample_info["view"] = reader.views[rows].astype(str)
        if reader.sexes is not None and reader.ages is not None:
            self.sample_info["sex"] = reader.sexes[rows].astype(str)
            self.sample_info["age"] = reader.ages[rows].astype(np.float64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.reader.image(self.rows[i])))
        if self.channels == 1:
            image = image.unsqueeze(0)
        return image, _target(self.targets[i], self.multilabel)

    def __getitems__(self, indices: Sequence[int]) -> StackedBatch:
        """A whole batch in one read (``DataLoader`` calls this instead of ``__getitem__``).

        The same images and targets as ``[self[i] for i in indices]``, already stacked:
        :func:`collate` passes them through, torch's ``default_collate`` still works.
        """
        index = np.asarray(indices, dtype=np.int64)
        # Torch-owned memory (not a numpy array's): a loader worker can move it to shared
        # memory, and pin_memory can copy it, as with default_collate's output.
        images = torch.empty((len(index), self.channels, self.load_size, self.load_size),
                             dtype=torch.uint8)
        self.reader.read(self.rows[index],
                         out=images.numpy()[:, 0] if self.channels == 1 else images.numpy())
        dtype = np.float32 if self.multilabel else np.int64  # as _target makes them
        targets = torch.from_numpy(np.ascontiguousarray(self.targets[index], dtype=dtype))
        return StackedBatch(images, targets)


class StackedBatch(Sequence):
    """A batch read at once: ``images`` uint8 ``[B, C, L, L]`` and ``targets`` ``[B, ...]``.

    Indexing yields per-sample ``(image, target)`` views, so code that collates samples
    (torch's ``default_collate``) gets the same batch; :func:`collate` skips that copy.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= k < len(self):
            raise IndexError(k)  # ends iteration (Sequence iterates until IndexError)
        return self.images[k], self.targets[k]


def collate(batch: Sequence) -> list[torch.Tensor]:
    """``default_collate``, but a :class:`StackedBatch` is passed through as
    ``[images, targets]`` (what ``default_collate`` makes of ``(image, target)`` samples)."""
    if isinstance(batch, StackedBatch):
        return [batch.images, batch.targets]
    return default_collate(batch)


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


def _drop_missing(exists: np.ndarray, names: np.ndarray, cfg: DataConfig, split: str,
                  source: str, root: Path, looked_in: str | None = None) -> np.ndarray:
    """``exists`` back, after an error naming the first missing image (a warning when
    ``data.on_bad_image=skip``); ``source`` lists the images, expected under ``root``
    (``looked_in``: the folders searched, when the layout has several)."""
    if exists.all():
        return exists
    missing = [str(n) for n, ok in zip(names, exists, strict=True) if not ok]
    where = f" ({looked_in})" if looked_in else ""
    if cfg.on_bad_image == "error":
        raise MetadataError(
            f"{len(missing)} {split} image(s) of {source} are not under {root}, "
            f"first {missing[0]!r}{where}; set data.on_bad_image=skip to train without them"
        )
    log.warning("%d %s images missing under %s (skipped), first %s; listed in %s%s",
                len(missing), split, root, missing[0], source, where)
    return exists


def chestxray14_dataset(cfg: DataConfig, split: str) -> Dataset:
    """ChestX-ray14 rows of one split, from the cache when ``data.cache`` is set.

    Raises:
        MetadataError: a patient in two splits, a bad list file, or missing images.
        CacheError: the cache was split with other settings than the recipe's.
    """
    want = _split_index(split)
    if cfg.cache is not None:
        return cached_dataset(cfg, split)
    root = _require_root(cfg)
    meta = read_metadata(find_metadata(root))
    splits = resolve_splits(meta, root, cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                            cfg.split_files)
    check_patient_overlap(meta.patients, splits, meta.source.name)
    mask = splits == want
    views = wanted_views(cfg)
    if views is not None:
        mask &= np.isin(meta.views, views)
    meta = meta.subset(mask)
    located = locate_images(root)
    found = located.paths
    exists = np.fromiter((n in found for n in meta.images), dtype=bool, count=len(meta.images))
    meta = meta.subset(_drop_missing(exists, meta.images, cfg, split, meta.source.name, root,
                                     located.looked_in()))
    paths = [found[n] for n in meta.images]
    info = {"image": meta.images.astype(str), "patient": meta.patients.astype(str),
            "view": meta.views.astype(str), "sex": meta.sexes.astype(str),
            "age": meta.ages.astype(np.float64)}
    return LabelledImages(paths, meta.labels, list(FINDINGS), True, 1, load_size(cfg),
                          cfg.on_bad_image, sample_info=info)


def cached_dataset(cfg: DataConfig, split: str) -> CachedImages:
    """One split of ``data.cache`` (ChestX-ray14, ImageFolder or CSV), as the files give it.

    Raises:
        CacheError: the cache holds another format, or was prepared with other CSV or split
            settings than the recipe's.
        MetadataError: a patient in two splits; ``data.views`` on a CSV (no view column).
    """
    assert cfg.cache is not None
    want = _split_index(split)
    reader = CacheReader(cfg.cache)
    reader.check_recipe(cfg)
    if reader.patients_known:  # where unknown, patients are image ids (repeated by ImageFolder)
        check_patient_overlap(reader.patients, reader.split, f"data.cache {cfg.cache}")
    rows = reader.rows(want)
    if reader.format == "chestxray14":
        views = wanted_views(cfg)
        if views is not None:
            rows = rows[np.isin(reader.views[rows], views)]
    elif reader.format == "csv" and cfg.views is not None:  # as table_dataset refuses it
        raise MetadataError(f"data.views: {cfg.csv.file if cfg.csv else cfg.cache} has no view "
                            "column; remove data.views")
    return CachedImages(reader, rows)


def imagefolder_dataset(cfg: DataConfig, split: str) -> Dataset:
    """``ROOT/<split>/<class>/*`` single-label images (``val`` also found as ``valid``).

    ``sample_info`` image ids are paths relative to ``ROOT/<split>``; no patients are known.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = _imagefolder_split(cfg, split)
    classes, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    paths = [Path(p) for p, _ in samples]
    targets = np.array([t for _, t in samples], dtype=np.int64)
    names = np.array([p.relative_to(folder).as_posix() for p in paths], dtype=str)
    return LabelledImages(paths, targets, classes, False, 3, load_size(cfg), cfg.on_bad_image,
                          sample_info={"image": names, "patient": names})


def _imagefolder_split(cfg: DataConfig, split: str) -> Path:
    root = _require_root(cfg)
    names = {"train": ["train"], "val": ["val", "valid"], "test": ["test"]}[split]
    folder = next((root / n for n in names if (root / n).is_dir()), None)
    if folder is None:
        raise MetadataError(f"data.root: {root} has no {' or '.join(names)}/ folder")
    return folder


# CSV files already told that they are split by image (the warning is given once per file).
_WARNED_BY_IMAGE: set[str] = set()


def read_csv_table(cfg: DataConfig) -> SampleTable:
    """A ``format: csv`` file as a table with its splits (see :class:`CsvConfig`).

    Splits come from ``csv.split_column``, else ``data.split_files``, else random by
    ``data.val_fraction``/``data.test_fraction``: by patient with ``csv.patient_column``,
    otherwise by image (with a warning that names ``csv.patient_column``).

    Raises:
        MetadataError: unreadable or empty file, missing columns, labels other than 0/1
            (blank included), unknown label names, bad split names (naming file, line and
            column).
    """
    assert cfg.csv is not None  # guaranteed by DataConfig
    spec = cfg.csv
    root = Path(cfg.root) if cfg.root else Path(spec.file).parent
    path = Path(spec.file)
    needed = [spec.path_column, *(spec.label_columns or []),
              *filter(None, [spec.label_column, spec.split_column, spec.patient_column])]
    rows = read_csv_rows(path, needed)
    if not rows:
        raise MetadataError(f"{path}: no rows after the header (data.csv.file lists one image "
                            "per row)")
    classes, targets = _csv_targets(rows, spec.label_columns, spec.label_column, spec.separator,
                                    spec.classes, path)
    images = np.array([r[spec.path_column].strip() for r in rows], dtype=object)
    patients = (None if spec.patient_column is None else
                np.array([r[spec.patient_column].strip() for r in rows], dtype=object))
    if spec.split_column is not None:
        split_of = np.array([r[spec.split_column].strip() for r in rows])
        bad = sorted(set(split_of) - set(SPLIT_NAMES))
        if bad:
            raise MetadataError(f"{path}: {spec.split_column} must be train/val/test, got {bad}")
        split = np.array([SPLIT_NAMES.index(s) for s in split_of], dtype=np.int8)
    else:
        lists = list_files(None, cfg.split_files)
        needs_groups = not lists or "train" not in lists  # some part is carved at random
        if patients is None and needs_groups and str(path) not in _WARNED_BY_IMAGE:
            _WARNED_BY_IMAGE.add(str(path))
            log.warning("%s: no data.csv.patient_column, so rows are split by image: a patient "
                        "with several images can land in two splits. Set csv.patient_column "
                        "to split by patient", path)
        if patients is None and not lists:  # by image, in the order dist-ft always used
            split = _random_split(len(rows), cfg.val_fraction, cfg.test_fraction,
                                  cfg.split_seed)
        else:
            groups = patients if patients is not None else np.arange(len(rows))
            split = assign_splits(images, targets, groups, cfg.val_fraction,
                                  cfg.test_fraction, cfg.split_seed, lists, path.name)
    return SampleTable(source=path, classes=list(classes), images=images,
                       paths=np.array([root / p for p in images], dtype=object),
                       labels=targets, split=split, patients=patients)


def _random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    part = np.zeros(n, dtype=np.int8)
    part[order[:n_val]] = 1
    part[order[n_val : n_val + n_test]] = 2
    return part


def _csv_targets(rows: list[dict[str, str]], label_columns: list[str] | None,
                 label_column: str | None, separator: str, fixed: list[str] | None,
                 path: Path) -> tuple[list[str], np.ndarray]:
    if label_columns is not None:
        targets = np.zeros((len(rows), len(label_columns)), dtype=np.float32)
        for k, r in enumerate(rows):
            for j, c in enumerate(label_columns):
                text = (r[c] or "").strip()  # None: the row is short of columns
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if value not in (0.0, 1.0):  # blank, 2, -1, nan, text
                    raise MetadataError(f"{path}:{k + 2}: column {c!r}: label {text!r}; "
                                        "expected 0 or 1")
                targets[k, j] = value
        return list(label_columns), targets
    assert label_column is not None  # guaranteed by CsvConfig
    label_lists = [[x.strip() for x in r[label_column].split(separator) if x.strip()]
                   for r in rows]
    classes = fixed or sorted({x for labels in label_lists for x in labels})
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for k, labels in enumerate(label_lists):
        for x in labels:
            if x not in index:
                raise MetadataError(f"{path}:{k + 2}: unknown label {x!r}; classes: "
                                    f"{', '.join(classes)}")
            targets[k, index[x]] = 1
    return list(classes), targets


# Tables read in this process: config JSON -> (stamp of its files, table). Train and val
# (and class_names) share one parse: MIMIC-CXR-JPG's CSVs hold 377k rows.
_TABLES: dict[str, tuple[tuple, SampleTable]] = {}
_MAX_TABLES = 2


def _stamp(cfg: DataConfig, source: Path) -> tuple:
    """Size and modification time of the files a table is read from, to notice a rewrite."""
    lists = cfg.split_files.model_dump().values() if cfg.split_files else ()
    stamp = []
    for file in [source, *filter(None, lists)]:
        try:
            stat = Path(file).stat()
            stamp.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def read_table(cfg: DataConfig) -> SampleTable:
    """The labelled source of a CSV, CheXpert or MIMIC-CXR-JPG recipe as a table with splits,
    its targets renamed to the shared ChestX-ray14 findings under ``data.labels_as``.

    The table is cached per config in this process and read again when its source file (or
    a split file) changes; callers must not modify its arrays.
    """
    key = cfg.model_dump_json()
    if key in _TABLES:
        stamp, table = _TABLES[key]
        if stamp == _stamp(cfg, table.source):
            return table
    table = _read_table(cfg)
    _TABLES.pop(key, None)
    while len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))  # the oldest
    _TABLES[key] = (_stamp(cfg, table.source), table)
    return table


def _read_table(cfg: DataConfig) -> SampleTable:
    readers = {"csv": read_csv_table, "chexpert": read_chexpert, "mimic_cxr": read_mimic}
    if cfg.format not in readers:
        raise ValueError(f"read_table reads csv, chexpert or mimic_cxr, not {cfg.format}")
    table = readers[cfg.format](cfg)
    if cfg.labels_as == "chestxray14":
        labels, classes = as_chestxray14(table.labels, table.classes)
        table = SampleTable(**{**table.__dict__, "labels": labels, "classes": classes})
    return table


def table_dataset(cfg: DataConfig, split: str) -> Dataset:
    """One split of a CSV, CheXpert or MIMIC-CXR-JPG source (view filters applied).

    Raises:
        MetadataError: a patient in two splits, or images missing (unless skipping).
    """
    want = _split_index(split)
    table = read_table(cfg)
    if table.patients is not None:
        check_patient_overlap(table.patients, table.split, str(table.source))
    mask = table.split == want
    if cfg.frontal_only and table.frontal is not None:
        mask &= table.frontal
    if cfg.views is not None:
        if table.views is None:
            raise MetadataError(f"data.views: {table.source} has no view column; remove "
                                "data.views")
        mask &= np.isin(table.views, cfg.views)
    table = table.subset(mask)
    exists = np.fromiter((Path(p).is_file() for p in table.paths), dtype=bool,
                         count=len(table))
    root = Path(cfg.root) if cfg.root else Path(table.source).parent  # csv: beside the file
    table = table.subset(_drop_missing(exists, table.images, cfg, split, str(table.source), root))
    channels = 3 if cfg.format == "csv" else 1  # radiographs are grey
    return LabelledImages(list(table.paths), table.labels, table.classes, True, channels,
                          load_size(cfg), cfg.on_bad_image, sample_info=table.sample_info())


def build_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The dataset of ``split`` (``train``, ``val`` or ``test``) for a recipe's ``data``.

    Raises:
        MetadataError: bad metadata, list files, a patient in two splits, missing images.
        CacheError: a cache split with other settings than the recipe's.
    """
    if cfg.cache is not None:  # chestxray14, imagefolder or csv (the schema allows no other)
        return cached_dataset(cfg, split)
    builders = {"chestxray14": chestxray14_dataset, "imagefolder": imagefolder_dataset,
                "csv": table_dataset, "chexpert": table_dataset, "mimic_cxr": table_dataset}
    return builders[cfg.format](cfg, split)


def split_datasets(cfg: DataConfig) -> tuple[dict[str, Dataset], list[str]]:
    """Every split's dataset as training builds it, for the tools that read a whole data set
    (``data stats``, ``data prepare``); an ImageFolder split without a folder is left out.

    Returns:
        The datasets by split name, and one problem per ImageFolder split whose classes differ
        from train's (its class indices would mean other classes).

    Raises:
        MetadataError: no ``train/`` folder, a class folder without images, or what the
            format's reader refuses.
    """
    sets: dict[str, Dataset] = {}
    for split in SPLIT_NAMES:
        try:
            sets[split] = build_dataset(cfg, split)
        except MetadataError:
            if cfg.format != "imagefolder":
                raise
            continue  # this split's folder is absent
        except FileNotFoundError as exc:  # torchvision: a class folder without images
            raise MetadataError(f"{cfg.root}: {split} split: {exc}") from None
    if "train" not in sets:
        raise MetadataError(f"{cfg.root}: no train/ folder; an ImageFolder tree has "
                            "train/<class>/*, val/<class>/* (or valid/) and test/<class>/*")
    classes = list(sets["train"].classes)
    problems = [
        f"the {split} split has classes {', '.join(ds.classes)} but train has "
        f"{', '.join(classes)}: class indices would not match between splits; give every "
        "split folder the same class folders, each with images"
        for split, ds in sets.items() if list(ds.classes) != classes
    ]
    return sets, problems


def class_names(cfg: DataConfig) -> list[str]:
    """The target names a recipe's data has, in target order, without reading images.

    ImageFolder lists the class folders of the train split; a CSV with a separated label
    column and no ``csv.classes`` reads the CSV; with ``data.cache`` both read its manifest.
    """
    if cfg.format == "chestxray14":
        return list(FINDINGS)
    if cfg.cache is not None and cfg.format in ("imagefolder", "csv"):
        return list(CacheReader(cfg.cache).classes)
    if cfg.format in ("chexpert", "mimic_cxr"):
        return list(SHARED_CHESTXRAY14 if cfg.labels_as == "chestxray14" else CHEXPERT_FINDINGS)
    if cfg.format == "imagefolder":
        from torchvision.datasets.folder import find_classes

        return list(find_classes(str(_imagefolder_split(cfg, "train")))[0])
    assert cfg.csv is not None  # guaranteed by DataConfig
    if cfg.csv.label_columns is not None:
        return list(cfg.csv.label_columns)
    if cfg.csv.classes is not None:
        return list(cfg.csv.classes)
    return read_table(cfg).classes

