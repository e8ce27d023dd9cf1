"""``dist-ft bench data``: both pipelines and prepare measured, and the model next to the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.data.cache import prepare_cache
from dist_ft.data.synth import write_synthetic


def test_data_suite_puts_the_models_rate_beside_the_loaders(run_cli, write_recipe,
                                                             tmp_path: Path) -> None:
    root = tmp_path / "png"
    write_synthetic(root, images=48, size=64, seed=0)
    prepare_cache(root, tmp_path / "cache", size=48, shard_size=16, workers=1, progress=False)
    recipe = write_recipe({"model": {"name": "resnet18", "pretrained": "none", "num_classes": 14},
                           "data": {"root": str(root), "image_size": 32, "batch_size": 4},
                           "output_dir": str(tmp_path / "run")})
    result = run_cli("bench", "data", str(root), "--cache", str(tmp_path / "cache"),
                     "--images", "32", "--batch-size", "8", "--image-size", "32",
                     "--repeats", "1", "--recipe", str(recipe), "--model-steps", "1", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["images"] == 32 and doc["cache_size"] == 48
    assert doc["png_images_per_s"] > 0 and doc["cache_images_per_s"] > 0
    model = doc["model"]
    assert (model["name"], model["batch"], model["image_size"]) == ("resnet18", 4, 32)
    assert model["png_feeds"] == pytest.approx(doc["png_images_per_s"] / model["images_per_s"])
    assert model["cache_feeds"] == pytest.approx(
        doc["cache_images_per_s"] / model["images_per_s"])
    table = run_cli("bench", "data", str(root), "--cache", str(tmp_path / "cache"),
                    "--images", "16", "--image-size", "32", "--repeats", "1", "--recipe", "none")
    assert table.code == 0 and "| cache (memmap) + batched augment |" in table.out
    assert "loader / model" not in table.out
