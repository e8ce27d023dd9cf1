"""CheXpert in its real layout: uncertain-label policies, patient-wise splits, views, mapping."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_ft.config.schema import ChexpertLabelsConfig, DataConfig
from dist_ft.data.datasets import build_dataset, class_names
from dist_ft.data.label_map import (
    CHEXPERT_FINDINGS,
    SHARED_CHESTXRAY14,
    apply_uncertain,
)
from dist_ft.data.metadata import MetadataError
from dist_ft.train.losses import build_loss

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
NAN = math.nan
# Cardiomegaly, Edema, Pleural Effusion of each image; every other finding is blank.
CARDIO, EDEMA, EFFUSION = (CHEXPERT_FINDINGS.index(f)
                           for f in ("Cardiomegaly", "Edema", "Pleural Effusion"))


def _write_release(root: Path, folder: str = "CheXpert-v1.0-small", train_patients: int = 12,
                   ) -> list[tuple[str, str, str, str]]:
    """train.csv (train_patients x 2 studies, frontal + lateral in the first) and valid.csv
    (3 patients), with 32 px JPEGs; returns (path, cardio, edema, effusion) of every row."""
    values = ["1.0", "0.0", "-1.0", ""]
    written = []
    for name, first, count in (("train", 1, train_patients), ("valid", 64541, 3)):
        rows = []
        for p in range(first, first + count):
            for study, view in ((1, "frontal"), (1, "lateral"), (2, "frontal")):
                k = len(written)
                number = 2 if view == "lateral" else 1
                rel = f"{folder}/{name}/patient{p:05d}/study{study}/view{number}_{view}.jpg"
                image = root / rel
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (32, 32), (k * 7) % 256).save(image)
                cells = [values[k % 4], values[(k // 4) % 4], values[(k + 1) % 4]]
                findings = [""] * len(CHEXPERT_FINDINGS)
                findings[CARDIO], findings[EDEMA], findings[EFFUSION] = cells
                rows.append([rel, "Female" if p % 2 else "Male", str(20 + p % 60),
                             view.capitalize(), "PA" if view == "frontal" else "", *findings])
                written.append((rel, *cells))
        with open(root / folder / f"{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([HEADER, *rows])
    return written


@pytest.fixture
def chexpert(tmp_path: Path) -> tuple[Path, list[tuple[str, str, str, str]]]:
    root = tmp_path / "chexpert"
    return root, _write_release(root)


def _all_splits(cfg: DataConfig) -> dict[str, object]:
    return {s: build_dataset(cfg, s) for s in ("train", "val", "test")}


@pytest.mark.parametrize(("policy", "uncertain"), [("ones", 1.0), ("zeros", 0.0),
                                                   ("ignore", NAN)])
def test_uncertain_policy_gives_the_expected_label_matrix(chexpert, policy, uncertain) -> None:
    root, written = chexpert
    cfg = DataConfig(format="chexpert", root=str(root), image_size=32,
                     chexpert=ChexpertLabelsConfig(uncertain=policy))
    value = {"1.0": 1.0, "0.0": 0.0, "": 0.0, "-1.0": uncertain}
    expected = {rel: [value[c], value[e], value[f]] for rel, c, e, f in written}
    seen = 0
    for ds in _all_splits(cfg).values():
        assert ds.classes == list(CHEXPERT_FINDINGS) and ds.channels == 1
        for i, image in enumerate(ds.sample_info["image"]):
            got = ds.targets[i][[CARDIO, EDEMA, EFFUSION]]
            np.testing.assert_array_equal(got, np.array(expected[image], dtype=np.float32))
            others = np.delete(ds.targets[i], [CARDIO, EDEMA, EFFUSION])
            assert not others.any()  # blank is 0
            seen += 1
    assert seen == len(written)


def test_per_finding_override_and_unknown_finding() -> None:
    raw = np.full((2, len(CHEXPERT_FINDINGS)), -1.0)
    raw[1] = 1.0
    cfg = ChexpertLabelsConfig(uncertain="zeros", per_finding={"Edema": "ones",
                                                               "Cardiomegaly": "ignore"})
    out = apply_uncertain(raw, cfg)
    assert out[0, EDEMA] == 1 and np.isnan(out[0, CARDIO]) and out[0, EFFUSION] == 0
    assert (out[1] == 1).all()
    with pytest.raises(MetadataError, match=r"per_finding: unknown finding\(s\) 'Edemma'"):
        apply_uncertain(raw, ChexpertLabelsConfig(per_finding={"Edemma": "ones"}))


def test_splits_are_patient_wise_and_valid_csv_is_test(chexpert) -> None:
    root, written = chexpert
    cfg = DataConfig(format="chexpert", root=str(root), val_fraction=0.25, split_seed=1)
    sets = _all_splits(cfg)
    patients = {s: set(ds.sample_info["patient"]) for s, ds in sets.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert patients["test"] == {"patient64541", "patient64542", "patient64543"}
    assert len(patients["val"]) == 3 and len(patients["train"]) == 9
    assert sum(len(ds) for ds in sets.values()) == len(written)
    other = build_dataset(DataConfig(format="chexpert", root=str(root), val_fraction=0.25,
                                     split_seed=2), "val")
    again = build_dataset(cfg, "val")
    assert list(again.sample_info["image"]) == list(sets["val"].sample_info["image"])
    assert set(other.sample_info["patient"]) != patients["val"]


def test_sample_info_frontal_filter_and_pixels(chexpert) -> None:
    root, _ = chexpert
    ds = build_dataset(DataConfig(format="chexpert", root=str(root), image_size=32,
                                  load_size=32), "test")
    info = ds.sample_info
    assert set(info) == {"image", "patient", "view", "sex", "age"}
    assert len(info["image"]) == len(ds) == 9
    assert info["image"][1] == "CheXpert-v1.0-small/valid/patient64541/study1/view2_lateral.jpg"
    assert list(info["view"][:3]) == ["PA", "LATERAL", "PA"]
    assert info["sex"][0] == "F" and info["age"][0] == 20 + 64541 % 60
    image, target = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert target.shape == (14,)
    frontal = build_dataset(DataConfig(format="chexpert", root=str(root), frontal_only=True),
                            "test")
    assert len(frontal) == 6 and set(frontal.sample_info["view"]) == {"PA"}
    lateral = build_dataset(DataConfig(format="chexpert", root=str(root), views=["LATERAL"]),
                            "test")
    assert len(lateral) == 3


def test_full_resolution_folder_and_missing_release(tmp_path: Path) -> None:
    _write_release(tmp_path / "full", folder="CheXpert-v1.0", train_patients=4)
    assert len(build_dataset(DataConfig(format="chexpert", root=str(tmp_path / "full")),
                             "test")) == 9
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetadataError, match=r"no CheXpert release.*CheXpert-v1.0-small/train"):
        build_dataset(DataConfig(format="chexpert", root=str(tmp_path / "empty")), "train")


def test_bad_value_names_file_line_and_column(chexpert) -> None:
    root, _ = chexpert
    path = root / "CheXpert-v1.0-small" / "valid.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[5 + CARDIO] = "2.0"
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"valid\.csv:4: column 'Cardiomegaly'.*'2\.0'"):
        build_dataset(DataConfig(format="chexpert", root=str(root)), "train")


def test_missing_image_is_named_or_skipped(chexpert) -> None:
    root, written = chexpert
    (root / written[-1][0]).unlink()
    with pytest.raises(MetadataError, match=r"1 test image\(s\).*view1_frontal\.jpg"):
        build_dataset(DataConfig(format="chexpert", root=str(root)), "test")
    kept = build_dataset(DataConfig(format="chexpert", root=str(root), on_bad_image="skip"),
                         "test")
    assert len(kept) == 8


def test_labels_as_chestxray14_renames_and_selects_shared_findings(chexpert) -> None:
    root, _ = chexpert
    plain = build_dataset(DataConfig(format="chexpert", root=str(root)), "test")
    cfg = DataConfig(format="chexpert", root=str(root), labels_as="chestxray14")
    mapped = build_dataset(cfg, "test")
    assert mapped.classes == list(SHARED_CHESTXRAY14) == class_names(cfg)
    assert mapped.classes == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                              "Effusion", "Pneumonia", "Pneumothorax"]
    np.testing.assert_array_equal(mapped.targets[:, 4], plain.targets[:, EFFUSION])
    np.testing.assert_array_equal(mapped.targets[:, 1], plain.targets[:, CARDIO])
    assert class_names(DataConfig(format="chexpert", root=str(root))) == list(CHEXPERT_FINDINGS)


def test_ignored_labels_are_masked_out_of_the_loss(chexpert) -> None:
    root, _ = chexpert
    ds = build_dataset(DataConfig(format="chexpert", root=str(root),
                                  chexpert=ChexpertLabelsConfig(uncertain="ignore")), "train")
    targets = torch.from_numpy(np.asarray(ds.targets))
    assert torch.isnan(targets).any()
    logits = torch.linspace(-2, 2, targets.numel()).reshape(targets.shape).requires_grad_()
    for name in ("bce", "bce_pos_weight", "focal"):
        loss = build_loss(name, True, ds.targets)(logits, targets)
        assert torch.isfinite(loss)
    bce = build_loss("bce", True, ds.targets)(logits, targets)
    known = ~torch.isnan(targets)
    direct = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.allclose(bce, direct)
    bce.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.isfinite(logits.grad).all()
