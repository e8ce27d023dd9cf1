"""Model factory: head sizing, state_dict files, ImageNet weights from the local cache only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from dist_ft.config.schema import ModelConfig
from dist_ft.models.factory import build_model
from dist_ft.models.weights import WeightsError, imagenet_weights_path


@pytest.mark.parametrize(
    "name", ["resnet18", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16", "resnet50"]
)
def test_random_init_model_has_task_head_and_runs(name: str) -> None:
    model = build_model(ModelConfig(name=name, num_classes=5)).eval()
    size = 224 if name.startswith("vit") else 64  # torchvision's ViT fixes its input size
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    assert out.shape == (1, 5)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_with_matching_head_loads_everything(tmp_path: Path, suffix: str) -> None:
    source = get_model("resnet18", weights=None, num_classes=4)
    path = tmp_path / f"w{suffix}"
    _save(source.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", num_classes=4, pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_with_other_head_keeps_fresh_classifier(
    tmp_path: Path, suffix: str
) -> None:
    source = get_model("densenet121", weights=None, num_classes=1000)
    path = tmp_path / f"w{suffix}"
    state = source.state_dict()
    if suffix == ".pt":  # also accept the usual wrappers and DDP prefixes
        _save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # type: ignore[dict-item]
    else:
        _save(state, path)
    model = build_model(ModelConfig(name="densenet121", num_classes=14, pretrained=str(path)))
    loaded = model.state_dict()
    assert loaded["classifier.weight"].shape == (14, 1024)
    assert torch.equal(loaded["features.conv0.weight"], state["features.conv0.weight"])
    assert torch.equal(
        loaded["features.denseblock4.denselayer16.conv2.weight"],
        state["features.denseblock4.denselayer16.conv2.weight"],
    )


def test_state_dict_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pt"
    torch.save(get_model("resnet34", weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit the model.*unexpected"):
        build_model(ModelConfig(name="resnet18", num_classes=2, pretrained=str(path)))


def test_corrupt_or_missing_weights_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read .*bad\.pt"):
        build_model(ModelConfig(name="resnet18", pretrained=str(bad)))
    with pytest.raises(WeightsError, match=r"no such file .*absent\.safetensors"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "absent.safetensors")))


def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError):
        build_model(ModelConfig(name="resnet18", pretrained=str(path)))
    assert not (tmp_path / "pwned").exists()


def test_imagenet_weights_not_cached_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(name="densenet121", pretrained="imagenet"))
    text = str(info.value)
    assert "not cached" in text and "densenet121-a639ec97.pth" in text
    assert "get_model('densenet121', weights='DEFAULT')" in text


def test_imagenet_weights_load_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in weights at the cache path torchvision would use: the real loading code runs
    # (no network: the file is found first), and the head is then resized for the task.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    reference = get_model("resnet18", weights=None)
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", pretrained="imagenet", num_classes=3))
    assert model.fc.out_features == 3
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_torchvision_published_densenet_pth_with_old_key_names_loads(tmp_path: Path) -> None:
    """torchvision's densenet121-a639ec97.pth names 'denselayer1.norm.1.weight' (today
    'norm1.weight'): as model.pretrained PATH and as weights for eval, it loads exactly."""
    import re

    from dist_ft.models.weights import load_weights_strict

    source = get_model("densenet121", weights=None, num_classes=14)
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old  # the published layout
    # (torchvision's file predates BatchNorm's num_batches_tracked counters too)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, path)
    model = build_model(ModelConfig(name="densenet121", num_classes=14, pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    fresh = build_model(ModelConfig(name="densenet121", num_classes=14))
    load_weights_strict(fresh, path, name="densenet121", num_classes=14)
    assert torch.equal(fresh.features.denseblock4.denselayer16.norm2.running_var,
                       source.features.denseblock4.denselayer16.norm2.running_var)
    # One tensor of another shape is named, with both shapes.
    old["features.denseblock1.denselayer1.conv.1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(old, path)
    with pytest.raises(WeightsError, match=r"features\.denseblock1\.denselayer1\.conv1\.weight: "
                                           r"file \(1, 1, 1, 1\) vs model \(128, 64, 1, 1\)"):
        build_model(ModelConfig(name="densenet121", num_classes=14, pretrained=str(path)))
