"""List files anywhere, split safety (patient overlap, cache split settings), CSV patient
splits, and per-sample info of every source."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_ft.config.schema import CsvConfig, DataConfig, SplitFilesConfig
from dist_ft.data.cache import CacheError, prepare_cache
from dist_ft.data.datasets import build_dataset, class_names
from dist_ft.data.findings import FINDINGS
from dist_ft.data.metadata import MetadataError, find_metadata, read_metadata

SPLITS = ("train", "val", "test")


def _meta(root: Path):
    return read_metadata(find_metadata(root))


def _write_list(path: Path, names) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(names) + "\n")
    return path


def _by_patient(meta, patients) -> list[str]:
    return [str(n) for n, p in zip(meta.images, meta.patients, strict=True) if p in patients]


def test_train_val_and_test_lists_anywhere(tiny_cxr14: Path, tmp_path: Path) -> None:
    meta = _meta(tiny_cxr14)
    patients = sorted(set(meta.patients.tolist()))
    test_names = _by_patient(meta, patients[:4])
    files = SplitFilesConfig(
        train_val=str(_write_list(tmp_path / "lists/tv.txt", _by_patient(meta, patients[4:]))),
        test=str(_write_list(tmp_path / "elsewhere/t.txt", test_names)))
    cfg = DataConfig(root=str(tiny_cxr14), split_files=files, val_fraction=0.25)
    sets = {s: build_dataset(cfg, s) for s in SPLITS}
    assert sorted(sets["test"].sample_info["image"]) == sorted(test_names)
    assert sum(len(d) for d in sets.values()) == len(meta)
    groups = [set(sets[s].sample_info["patient"]) for s in SPLITS]
    assert not (groups[0] & groups[1]) and len(groups[1]) > 0


def test_explicit_train_val_test_lists(tiny_cxr14: Path, tmp_path: Path) -> None:
    meta = _meta(tiny_cxr14)
    patients = sorted(set(meta.patients.tolist()))
    names = {s: _by_patient(meta, patients[k::3]) for k, s in enumerate(SPLITS)}
    names["train"] = names["train"][:-1]  # an unlisted image is in no split
    files = SplitFilesConfig(**{s: str(_write_list(tmp_path / f"{s}.lst", names[s]))
                                for s in SPLITS})
    cfg = DataConfig(root=str(tiny_cxr14), split_files=files)
    for s in SPLITS:
        assert list(build_dataset(cfg, s).sample_info["image"]) == \
            [n for n in meta.images if n in names[s]]


def test_bad_lists_are_named(tiny_cxr14: Path, tmp_path: Path) -> None:
    meta = _meta(tiny_cxr14)
    good = _write_list(tmp_path / "test.txt", meta.images[:3])
    missing = SplitFilesConfig(train_val=str(tmp_path / "nope.txt"), test=str(good))
    with pytest.raises(MetadataError, match=r"data\.split_files\.train_val: .*nope\.txt is not"):
        build_dataset(DataConfig(root=str(tiny_cxr14), split_files=missing), "train")
    unknown = _write_list(tmp_path / "tv.txt", ["x1.png", "x2.png", "x3.png", "x4.png",
                                                *meta.images[3:]])
    cfg = DataConfig(root=str(tiny_cxr14),
                     split_files=SplitFilesConfig(train_val=str(unknown), test=str(good)))
    with pytest.raises(MetadataError, match=r"tv\.txt: 4 image\(s\) not in Data_Entry_2017"
                                            r"\.csv, first 'x1\.png', 'x2\.png', 'x3\.png'"):
        build_dataset(cfg, "train")
    both = _write_list(tmp_path / "tv2.txt", meta.images[2:])
    cfg = DataConfig(root=str(tiny_cxr14),
                     split_files=SplitFilesConfig(train_val=str(both), test=str(good)))
    with pytest.raises(MetadataError, match=rf"both list 1 image\(s\), first '{meta.images[2]}'"):
        build_dataset(cfg, "train")


def test_patient_overlap_between_lists_is_an_error(tiny_cxr14: Path, tmp_path: Path) -> None:
    meta = _meta(tiny_cxr14)
    shared = next(p for p in meta.patients if (meta.patients == p).sum() > 1)
    rows = np.flatnonzero(meta.patients == shared)
    test = _write_list(tmp_path / "t.txt", [meta.images[rows[0]]])
    rest = _write_list(tmp_path / "tv.txt", [n for n in meta.images if n != meta.images[rows[0]]])
    cfg = DataConfig(root=str(tiny_cxr14),
                     split_files=SplitFilesConfig(train_val=str(rest), test=str(test)))
    with pytest.raises(MetadataError, match=rf"1 patient\(s\) are in more than one split.*"
                                            rf"e\.g\. {shared};.*data\.split_files"):
        build_dataset(cfg, "train")


def test_cache_refuses_other_split_settings_and_edited_lists(tiny_cxr14: Path,
                                                              tmp_path: Path) -> None:
    meta = _meta(tiny_cxr14)
    patients = sorted(set(meta.patients.tolist()))
    test = _write_list(tmp_path / "t.txt", _by_patient(meta, patients[:3]))
    files = SplitFilesConfig(test=str(test))
    prepare_cache(tiny_cxr14, tmp_path / "c", size=32, progress=False, split_files=files)
    ok = build_dataset(DataConfig(cache=str(tmp_path / "c"), split_files=files), "test")
    assert sorted(ok.sample_info["image"]) == sorted(_by_patient(meta, patients[:3]))
    with pytest.raises(CacheError, match=r"other list files: data\.split_files is none in the "
                                         r"recipe but test=.*t\.txt.*--rebuild"):
        build_dataset(DataConfig(cache=str(tmp_path / "c")), "train")
    _write_list(test, _by_patient(meta, patients[:2]))  # edited since prepare
    with pytest.raises(CacheError, match=r"other list files"):
        build_dataset(DataConfig(cache=str(tmp_path / "c"), split_files=files), "train")
    # Lists in the data root: editing one after prepare is refused too.
    prepare_cache(tiny_cxr14, tmp_path / "c2", size=32, progress=False)
    build_dataset(DataConfig(cache=str(tmp_path / "c2")), "train")
    _write_list(tiny_cxr14 / "test_list.txt", _by_patient(meta, patients[:2]))
    with pytest.raises(CacheError, match=r"another .*test_list\.txt \(the file changed"):
        build_dataset(DataConfig(cache=str(tmp_path / "c2")), "train")


def test_cache_sample_info_and_an_older_index(tiny_cxr14: Path, tmp_path: Path) -> None:
    prepare_cache(tiny_cxr14, tmp_path / "c", size=32, progress=False)
    png = build_dataset(DataConfig(root=str(tiny_cxr14)), "val")
    cached = build_dataset(DataConfig(cache=str(tmp_path / "c")), "val")
    assert set(cached.sample_info) == {"image", "patient", "view", "sex", "age"}
    for key, values in png.sample_info.items():
        if key == "age":
            np.testing.assert_allclose(cached.sample_info[key], values)
        else:
            assert list(cached.sample_info[key]) == list(values), key
    index = tmp_path / "c" / "index.npz"
    with np.load(index) as z:  # as written before ages and sexes were indexed
        old = {k: z[k] for k in z.files if k not in ("ages", "sexes")}
    np.savez(index, **old)
    older = build_dataset(DataConfig(cache=str(tmp_path / "c")), "val")
    assert set(older.sample_info) == {"image", "patient", "view"} and len(older) == len(png)


def test_chestxray14_and_imagefolder_sample_info_and_class_names(tiny_cxr14: Path,
                                                                  tmp_path: Path) -> None:
    cfg = DataConfig(root=str(tiny_cxr14))
    ds = build_dataset(cfg, "train")
    meta = _meta(tiny_cxr14)
    row = {n: i for i, n in enumerate(meta.images)}[ds.sample_info["image"][0]]
    assert ds.sample_info["patient"][0] == str(meta.patients[row])
    assert ds.sample_info["view"][0] == meta.views[row] and ds.sample_info["sex"][0] in "MF"
    assert ds.sample_info["age"][0] == meta.ages[row]
    assert all(len(v) == len(ds) for v in ds.sample_info.values())
    assert class_names(cfg) == list(FINDINGS)
    for split in ("train", "val"):
        for label in ("cats", "dogs"):
            (tmp_path / "f" / split / label).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "f" / split / label / "a.jpg")
    folder = DataConfig(format="imagefolder", root=str(tmp_path / "f"))
    ds = build_dataset(folder, "val")
    assert list(ds.sample_info["image"]) == ["cats/a.jpg", "dogs/a.jpg"]
    assert list(ds.sample_info["patient"]) == list(ds.sample_info["image"])
    assert class_names(folder) == ["cats", "dogs"]


def _csv_data(tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    if not path.exists():
        rows = [["file", "labels", "subject"]]
        for k in range(40):
            name = f"img/{k}.png"
            (tmp_path / "img").mkdir(exist_ok=True)
            Image.new("RGB", (32, 32), (k, k, k)).save(tmp_path / name)
            rows.append([name, ["a", "b", "a|b", ""][k % 4], f"p{k // 4}"])
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return path


def test_csv_with_a_patient_column_splits_by_patient(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = _csv_data(tmp_path)
    spec = CsvConfig(file=str(path), path_column="file", label_column="labels",
                     patient_column="subject")
    cfg = DataConfig(format="csv", csv=spec, val_fraction=0.2, test_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        sets = {s: build_dataset(cfg, s) for s in SPLITS}
    assert "split by image" not in caplog.text
    groups = [set(sets[s].sample_info["patient"]) for s in SPLITS]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2])
    assert not (groups[1] & groups[2])
    assert [len(g) for g in groups] == [6, 2, 2]
    assert sum(len(d) for d in sets.values()) == 40
    assert class_names(cfg) == ["a", "b"]


def test_csv_without_patients_warns_once_that_it_splits_by_image(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _csv_data(tmp_path)
    spec = CsvConfig(file=str(path), path_column="file", label_column="labels")
    cfg = DataConfig(format="csv", csv=spec)
    with caplog.at_level(logging.WARNING):
        sets = {s: build_dataset(cfg, s) for s in SPLITS}
    warnings = [r for r in caplog.records if "split by image" in r.getMessage()]
    assert len(warnings) == 1 and "csv.patient_column" in warnings[0].getMessage()
    info = sets["train"].sample_info
    assert list(info["patient"]) == list(info["image"]) and info["image"][0].startswith("img/")
    assert not math.isnan(float(sets["train"].targets.sum()))
