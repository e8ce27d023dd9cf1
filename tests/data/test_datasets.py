"""Datasets from every source, batched transforms, and a learnable synthetic twin."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dist_ft.config.schema import CsvConfig, DataConfig
from dist_ft.data.cache import prepare_cache
from dist_ft.data.datasets import build_dataset, read_table
from dist_ft.data.metadata import MetadataError
from dist_ft.data.transforms import BatchAugment, BatchNormalize, BatchResize


def test_png_and_cache_sources_give_the_same_split_and_pixels(
    tiny_cxr14: Path, tmp_path: Path
) -> None:
    prepare_cache(tiny_cxr14, tmp_path / "c", size=48, progress=False)
    png = build_dataset(DataConfig(root=str(tiny_cxr14), image_size=48, load_size=48), "train")
    cached = build_dataset(DataConfig(cache=str(tmp_path / "c"), image_size=48), "train")
    assert len(png) == len(cached) > 0
    for i in range(len(png)):
        (a, ya), (b, yb) = png[i], cached[i]
        assert a.dtype == torch.uint8 and a.shape == (1, 48, 48)
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_views_filter_and_missing_images(tiny_cxr14: Path) -> None:
    all_train = build_dataset(DataConfig(root=str(tiny_cxr14)), "train")
    pa = build_dataset(DataConfig(root=str(tiny_cxr14), views=["PA"]), "train")
    assert 0 < len(pa) < len(all_train)
    frontal = build_dataset(DataConfig(root=str(tiny_cxr14), frontal_only=True), "train")
    assert len(frontal) == len(all_train)  # every ChestX-ray14 view is PA or AP
    none = DataConfig(root=str(tiny_cxr14), views=["LL"], frontal_only=True)
    assert len(build_dataset(none, "train")) == 0
    victim = sorted(tiny_cxr14.glob("images_*/images/*.png"))[0]
    victim.unlink()
    with pytest.raises(MetadataError, match=rf"first '{victim.name}'.*on_bad_image=skip"):
        for split in ("train", "val", "test"):
            build_dataset(DataConfig(root=str(tiny_cxr14)), split)
    kept = sum(len(build_dataset(DataConfig(root=str(tiny_cxr14), on_bad_image="skip"), s))
               for s in ("train", "val", "test"))
    assert kept == 39


def test_imagefolder_dataset(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for label in ("ants", "bees"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    ds = build_dataset(DataConfig(format="imagefolder", root=str(tmp_path), image_size=32,
                                  load_size=36), "train")
    image, target = ds[4]
    assert ds.classes == ["ants", "bees"] and not ds.multilabel and len(ds) == 6
    assert image.shape == (3, 36, 36) and target.dtype == torch.int64 and int(target) == 1
    assert len(build_dataset(DataConfig(format="imagefolder", root=str(tmp_path)), "val")) == 4
    with pytest.raises(MetadataError, match="no test/ folder"):
        build_dataset(DataConfig(format="imagefolder", root=str(tmp_path)), "test")


def _csv(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    for r in rows:
        Image.new("L", (20, 20), 128).save(tmp_path / r["path"])
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_dataset_with_separator_and_split_column(tmp_path: Path) -> None:
    rows = [{"path": f"{i}.png", "labels": ["cat|dog", "dog", "", "cat"][i % 4],
             "split": ["train", "val"][i % 2]} for i in range(8)]
    path = _csv(tmp_path, rows)
    cfg = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_column="labels",
                                                 split_column="split"))
    ds = build_dataset(cfg, "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.multilabel
    assert ds[0][1].tolist() == [1.0, 1.0] and ds[1][1].tolist() == [0.0, 0.0]
    bad = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_column="labels",
                                                 classes=["cat"], split_column="split"))
    with pytest.raises(MetadataError, match=r"labels\.csv:2: unknown label 'dog'"):
        build_dataset(bad, "train")


def test_csv_dataset_with_label_columns_and_missing_column(tmp_path: Path) -> None:
    rows = [{"path": f"{i}.png", "a": str(i % 2), "b": "1"} for i in range(10)]
    path = _csv(tmp_path, rows)
    cfg = DataConfig(format="csv", val_fraction=0.2, test_fraction=0.2,
                     csv=CsvConfig(file=str(path), label_columns=["a", "b"]))
    sizes = [len(build_dataset(cfg, s)) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    missing = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_columns=["a", "c"]))
    with pytest.raises(MetadataError, match=r"missing column 'c'"):
        build_dataset(missing, "train")


@pytest.mark.parametrize("value", ["nan", "2", "-1", "", "yes"])
def test_csv_label_columns_reject_anything_but_0_and_1(tmp_path: Path, value: str) -> None:
    rows = [{"path": f"{i}.png", "a": "1", "b": "0"} for i in range(4)]
    rows[2]["b"] = value
    path = _csv(tmp_path, rows)
    cfg = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_columns=["a", "b"]))
    with pytest.raises(MetadataError,
                       match=rf"labels\.csv:4: column 'b': label '{value}'; expected 0 or 1"):
        build_dataset(cfg, "train")


def test_a_header_only_csv_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("path,a\n")
    cfg = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_columns=["a"]))
    with pytest.raises(MetadataError, match=r"labels\.csv: no rows after the header"):
        build_dataset(cfg, "train")
    path.write_bytes(b"path,a\n\xff\xfe,1\n")  # not UTF-8: named, not a UnicodeDecodeError
    with pytest.raises(MetadataError, match=r"labels\.csv: cannot read"):
        build_dataset(cfg, "train")


def test_a_table_is_parsed_once_per_config_until_its_file_changes(tmp_path: Path) -> None:
    rows = [{"path": f"{i}.png", "a": str(i % 2)} for i in range(10)]
    path = _csv(tmp_path, rows)
    cfg = DataConfig(format="csv", csv=CsvConfig(file=str(path), label_columns=["a"]))
    first = read_table(cfg)
    assert read_table(cfg) is first
    assert read_table(cfg.model_copy(update={"batch_size": 3})) is not first  # another config
    _csv(tmp_path, rows[:8])
    again = read_table(cfg)
    assert again is not first and len(again) == 8
    assert sum(len(build_dataset(cfg, s)) for s in ("train", "val", "test")) == 8


def test_batch_augment_is_reproducible_and_shaped() -> None:
    images = torch.randint(0, 256, (6, 1, 40, 40), dtype=torch.uint8)
    augment = BatchAugment(32, crop_scale=(0.5, 1.0), rotation_deg=10)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert a.shape == (6, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255


def test_identity_augment_reproduces_the_image() -> None:
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    identity = BatchAugment(16, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False,
                            rotation_deg=0)
    assert torch.allclose(identity(images), images.float(), atol=1e-3)
    flipped = BatchAugment(16, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation_deg=0)
    out = flipped(images, torch.Generator().manual_seed(0))
    for k in range(2):
        assert torch.allclose(out[k], images[k].float(), atol=1e-3) or torch.allclose(
            out[k], images[k].float().flip(-1), atol=1e-3)


def test_normalize_matches_imagenet_formula() -> None:
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = BatchNormalize()(BatchResize(8)(images))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (images.float().expand(-1, 3, -1, -1) / 255 - mean) / std
    assert out.shape == (2, 3, 8, 8) and torch.allclose(out, expected, atol=1e-5)


def test_the_synthetic_twin_is_learnable(tmp_path: Path) -> None:
    """A plain loop: resnet18 from scratch, 32 px, 3 epochs, mean val AUROC >= 0.9."""
    from torchmetrics.classification import MultilabelAUROC
    from torchvision.models import get_model

    from dist_ft.data.synth import write_synthetic

    write_synthetic(tmp_path, images=800, size=32, seed=0)
    cfg = DataConfig(root=str(tmp_path), image_size=32, load_size=32, val_fraction=0.2)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None, num_classes=14)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    augment = BatchAugment(32, crop_scale=(0.85, 1.0), hflip=False, rotation_deg=5)
    normalize, resize = BatchNormalize(), BatchResize(32)
    generator = torch.Generator().manual_seed(0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(3):
        model.train()
        for x, y in DataLoader(train, batch_size=32, shuffle=True):
            loss = loss_fn(model(normalize(augment(x, generator))), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    auroc = MultilabelAUROC(num_labels=14, average=None)
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=64):
            auroc.update(torch.sigmoid(model(normalize(resize(x)))), y.int())
    per_class = auroc.compute()
    assert float(per_class.mean()) >= 0.9, per_class
    assert np.isfinite(per_class.numpy()).all()
