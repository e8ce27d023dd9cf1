"""``dist-ft eval`` on a weights file: the report with references, JSON, plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torchvision.models import get_model

from tests.conftest import CONFIGS, CliResult


def _run_dir(tmp_path: Path, data: Path) -> Path:
    recipe = yaml.safe_load((CONFIGS / "chestxray14_smoke.yaml").read_text())
    recipe["data"]["root"] = str(data)
    recipe["data"]["image_size"] = recipe["data"]["load_size"] = 32
    (tmp_path / "final").mkdir()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None, num_classes=14)
    save_file(model.state_dict(), str(tmp_path / "final" / "model.safetensors"))
    return tmp_path / "final" / "model.safetensors"


def test_eval_writes_table_json_and_plots(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    result = run_cli("eval", str(weights), "--split", "test", "--resamples", "20", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["split"] == "test" and report["images"] > 0
    assert report["weights_kind"] == "final" and report["weights"] == str(weights)
    assert set(report["classes"]) >= {"Atelectasis", "Pneumothorax"}
    table = (weights.parent / "eval_test.md").read_text()
    assert "CheXNet 2017" in table and "0.809" in table  # CheXNet's Atelectasis
    assert (weights.parent / "roc_test.png").stat().st_size > 1000
    assert (weights.parent / "reliability_test.png").stat().st_size > 1000


def test_eval_without_recipe_names_the_fix(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    result = run_cli("eval", str(tmp_path / "x" / "model.safetensors"))
    assert result.code == 2 and "pass --config RECIPE" in result.err
