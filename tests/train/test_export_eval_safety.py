"""``dist-ft eval`` / ``export``: outputs never destroy inputs, weights load strictly."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.models import get_model

from dist_ft.config.schema import ModelConfig
from dist_ft.models.factory import build_model
from dist_ft.models.weights import WeightsError, load_weights_strict
from tests.conftest import CliResult
from tests.train.test_eval_cli import _run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _five_class_weights(weights: Path) -> None:
    """Replace the run's 14-class weights by weights trained for 5 classes."""
    torch.manual_seed(1)
    save_file(get_model("resnet18", weights=None, num_classes=5).state_dict(), str(weights))


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# ----------------------------------------------------------------- outputs vs inputs
def test_export_onto_its_own_weights_is_refused_before_any_work(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    before = _digest(weights)
    result = run_cli("export", str(weights), "--format", "torchscript", "--out", str(weights))
    assert result.code == 2
    assert result.err.strip() == (
        f"dist-ft export: error: output {weights} is the input weights {weights}: writing it "
        "would destroy what is read; pass another --out")
    assert _digest(weights) == before

    # The int8 variant's name is checked too: final/w.safetensors -> final/w.int8.safetensors.
    int8_named = weights.with_name("w.int8.safetensors")
    shutil.copy(weights, int8_named)
    result = run_cli("export", str(int8_named), "--format", "torchscript", "--quantize",
                     "dynamic", "--out", str(weights.with_name("w.safetensors")))
    assert result.code == 2 and f"is the input weights {int8_named}" in result.err
    assert not weights.with_name("w.safetensors").exists()
    assert _digest(int8_named) == before

    recipe = tmp_path / "recipe.yaml"
    recipe_before = recipe.read_bytes()
    result = run_cli("export", str(weights), "--format", "torchscript", "--out", str(recipe))
    assert result.code == 2 and f"is the input recipe {recipe}" in result.err
    assert recipe.read_bytes() == recipe_before


def test_outputs_inside_the_data_folder_are_refused(
    run_cli: Callable[..., CliResult], tiny_cxr14: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14)
    listing = sorted(tiny_cxr14.rglob("*"))
    inside = tiny_cxr14 / "exports" / "model.pt"
    result = run_cli("export", str(weights), "--format", "torchscript", "--out", str(inside))
    assert result.code == 2
    assert result.err.strip() == (
        f"dist-ft export: error: output {inside} is inside the input folder data.root "
        f"{tiny_cxr14}: dist-ft never writes into its inputs; pass another --out")
    result = run_cli("eval", str(weights), "--out", str(tiny_cxr14))
    assert result.code == 2
    assert result.err.strip() == (
        f"dist-ft eval: error: output {tiny_cxr14}/eval_val.json is inside the input folder "
        f"data.root {tiny_cxr14}: dist-ft never writes into its inputs; pass another --out")
    assert sorted(tiny_cxr14.rglob("*")) == listing


def test_eval_out_onto_the_weights_file_is_refused(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    before = _digest(weights)
    result = run_cli("eval", str(weights), "--out", str(weights))
    assert result.code == 2
    assert result.err.strip() == (
        f"dist-ft eval: error: cannot write {weights}/eval_val.json: {weights} is a file, "
        "not a folder; pass another --out")
    assert _digest(weights) == before


def test_a_failed_export_leaves_the_previous_file_and_no_partial_one(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    assert run_cli("export", str(weights), "--format", "torchscript").code == 0
    exported = weights.with_name("model.torchscript.pt")
    before = _digest(exported)
    # No export can be within a negative tolerance: verification fails after the write.
    result = run_cli("export", str(weights), "--format", "torchscript", "--tolerance", "-1")
    assert result.code == 1
    assert f"differs from PyTorch by 0 > -1; nothing written to {exported}" in result.err
    assert _digest(exported) == before
    assert _temporaries(weights.parent) == []


def test_eval_writes_its_files_whole_and_leaves_no_temporaries(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    out = tmp_path / "reports" / "deep"
    result = run_cli("eval", str(weights), "--out", str(out), "--split", "test",
                     "--resamples", "20")
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_test.json", "eval_test.md", "reliability_test.png", "roc_test.png",
        "scores_test.npz"]
    assert _temporaries(tmp_path) == []


# ----------------------------------------------------------------- strict weights
def test_eval_and_export_refuse_weights_of_another_class_count(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    _five_class_weights(weights)
    before = _digest(weights)
    expected = (
        f"weights {weights} do not fit the model: 2 tensor(s) of another shape: fc.weight: "
        "file (5, 512) vs model (14, 512); fc.bias: file (5,) vs model (14,). Likely cause: "
        "the weights have 5 classes but the recipe's model.num_classes is 14: pass the "
        "--config of the run that trained them, or set model.num_classes=5")
    result = run_cli("eval", str(weights), "--split", "test")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == f"dist-ft eval: error: {expected}"
    result = run_cli("export", str(weights), "--format", "torchscript")
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == f"dist-ft export: error: {expected}"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["model.safetensors"]
    assert _digest(weights) == before
    # With the class count the weights were trained for, they load and export.
    result = run_cli("export", str(weights), "model.num_classes=5", "--format", "torchscript")
    assert result.code == 0, result.err


def test_strict_loading_names_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    state = get_model("resnet18", weights=None, num_classes=14).state_dict()
    del state["layer1.0.bn1.running_mean"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    model = build_model(ModelConfig(name="resnet18", num_classes=14))
    with pytest.raises(WeightsError) as info:
        load_weights_strict(model, path, name="resnet18", num_classes=14)
    assert str(info.value) == (
        f"weights {path} do not fit the model: 1 missing (first: layer1.0.bn1.running_mean); "
        "1 unexpected (first: extra.weight). Likely cause: the weights are not of the "
        "recipe's model.name=resnet18 with model.num_classes=14: pass the --config of the run "
        "that trained them")


def test_training_keeps_the_lenient_head_swap_for_pretrained(tmp_path: Path) -> None:
    path = tmp_path / "five.safetensors"
    _five_class_weights(path)
    model = build_model(ModelConfig(name="resnet18", num_classes=14, pretrained=str(path)))
    assert model.fc.out_features == 14  # a fresh head for the new task, the body loaded
    assert torch.equal(model.conv1.weight, load_file(str(path))["conv1.weight"])
