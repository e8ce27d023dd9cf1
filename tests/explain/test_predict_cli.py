"""``dist-ft predict`` end to end: twin PNGs and a DICOM in, CSV and overlays out; bad input."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import get_model

from dist_ft.data.findings import FINDINGS
from dist_ft.explain.predict import collect_images, heatmap_stems, overlay
from tests.conftest import CONFIGS, CliResult
from tests.data.test_dicom import ramp, write_dicom


@pytest.fixture
def run_folder(tmp_path: Path, tiny_cxr14_session: Path) -> Path:
    """A finished-looking run: recipe.yaml (32 px) and final/ random resnet18 weights."""
    run = tmp_path / "run"
    recipe = yaml.safe_load((CONFIGS / "chestxray14_smoke.yaml").read_text())
    recipe["data"]["root"] = str(tiny_cxr14_session)
    recipe["data"]["image_size"] = recipe["data"]["load_size"] = 32
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None, num_classes=14)
    save_file(model.state_dict(), str(run / "final" / "model.safetensors"))
    return run


@pytest.fixture
def scans(tmp_path: Path, tiny_cxr14_session: Path) -> Path:
    """A folder of three twin PNGs (one in a subfolder) and a MONOCHROME1 DICOM."""
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    pngs = sorted(tiny_cxr14_session.glob("images_*/images/*.png"))[:3]
    shutil.copy(pngs[0], folder)
    shutil.copy(pngs[1], folder)
    shutil.copy(pngs[2], folder / "sub")
    write_dicom(folder / "sub" / "chest.dcm", ramp(64, 64), "MONOCHROME1", window=(2000, 3000))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_folder_writes_csv_and_heatmaps(
    run_cli: Callable[..., CliResult], run_folder: Path, scans: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds"
    result = run_cli("predict", str(run_folder), str(scans), "--out", str(out),
                     "--batch-size", "3", "--json")
    assert result.code == 0, result.err
    assert "has no best/ weights" in result.err and "took final/" in result.err
    summary = json.loads(result.out)
    assert summary["images"] == 4 and summary["weights_kind"] == "final"
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", *FINDINGS] and len(rows) == 4
    assert {Path(r["path"]).suffix for r in rows} == {".png", ".dcm"}
    probs = np.array([[float(r[f]) for f in FINDINGS] for r in rows])
    assert np.all((probs > 0) & (probs < 1))
    assert not (out / "heatmaps").exists()
    # Overlays for exactly the (image, finding) pairs at or above the threshold: the five
    # highest probabilities here.
    ranked = np.sort(probs.ravel())
    threshold = float((ranked[-5] + ranked[-6]) / 2)
    result = run_cli("predict", str(run_folder), str(scans), "--out", str(tmp_path / "maps"),
                     "--heatmaps", "--threshold", str(threshold), "--json")
    assert result.code == 0, result.err
    maps = sorted((tmp_path / "maps" / "heatmaps").glob("*.png"))
    names = [Path(r["path"]).stem for r in rows]
    expected = sorted(f"{names[i]}__{FINDINGS[k]}.png" for i, k in zip(
        *np.nonzero(probs >= threshold), strict=True))
    assert [m.name for m in maps] == expected and json.loads(result.out)["heatmaps"] == 5
    overlay_img = Image.open(maps[0])
    assert overlay_img.mode == "RGB" and overlay_img.size == (32, 32)
    assert not list(out.rglob("*.tmp"))


def test_predict_glob_csv_and_dicom_file(
    run_cli: Callable[..., CliResult], run_folder: Path, scans: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "worklist.csv"
    listing.write_text("id,path\n1,scans/sub/chest.dcm\n")
    out = tmp_path / "p2"
    weights = run_folder / "final" / "model.safetensors"
    result = run_cli("predict", str(weights), str(listing), str(scans / "*.png"),
                     "--out", str(out))
    assert result.code == 0, result.err
    assert "scored 3 image(s)" in result.out
    assert not (out / "heatmaps").exists()


def test_predict_refuses_bad_inputs(
    run_cli: Callable[..., CliResult], run_folder: Path, scans: Path, tmp_path: Path
) -> None:
    result = run_cli("predict", str(run_folder), str(tmp_path / "nothing*.png"),
                     "--out", str(tmp_path / "o"))
    assert result.code == 2 and "nothing*.png': matches no file" in result.err
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("predict", str(run_folder), str(empty), "--out", str(tmp_path / "o"))
    assert result.code == 2 and f"folder {empty}: no PNG, JPEG or DICOM" in result.err
    result = run_cli("predict", str(run_folder), str(scans), "--out", str(scans / "out"))
    assert result.code == 2 and "inside the input folder IMAGES" in result.err
    assert not (scans / "out").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run_cli("predict", str(run_folder), str(bad), "--out", str(tmp_path / "o3"))
    assert result.code == 1 and "broken.png: cannot decode image" in result.err
    assert not (tmp_path / "o3" / "predictions.csv").exists()


def test_collect_images_and_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file or folder"):
        collect_images([str(tmp_path / "missing.png")])
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    assert heatmap_stems([a, b, tmp_path / "y.dcm"]) == ["x~1", "x~2", "y"]
    listing = tmp_path / "list.csv"
    listing.write_text("first\nimgs/one.png\n\n/abs/two.png\n")  # no 'path' column: first one
    assert collect_images([str(listing)]) == [tmp_path / "imgs" / "one.png",
                                              Path("/abs/two.png")]


def test_overlay_blends_by_heat() -> None:
    gray = np.full((4, 4), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    rgb = overlay(gray, heat, alpha=0.5)
    assert rgb.shape == (4, 4, 3) and np.all(rgb[1:, 1:] == 100)  # cold: the image itself
    assert tuple(rgb[0, 0]) != (100, 100, 100)
