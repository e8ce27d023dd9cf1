"""Grad-CAM on a tiny instance of every supported family: shape, range, and the maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import ConvNeXt, DenseNet, ResNet, VisionTransformer
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.resnet import BasicBlock

from dist_ft.config.architectures import FAMILIES
from dist_ft.explain.gradcam import cell_size, default_layer, gradcam, map_spec

SIZE = 64


def tiny(family: str) -> nn.Module:
    """A random-weight model of ``family``'s torchvision class, small enough for CPU."""
    torch.manual_seed(0)
    if family == "densenet":
        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=4)
    elif family == "resnet":
        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4)
    elif family == "convnext":
        model = ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=4,
                         layer_scale=1.0)
    elif family == "efficientnet":
        setting = [MBConvConfig(1, 3, 1, 16, 16, 1, 1.0, 1.0),
                   MBConvConfig(4, 3, 2, 16, 24, 1, 1.0, 1.0)]
        model = EfficientNet(setting, dropout=0.0, num_classes=4)
    elif family == "vit":
        model = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2,
                                  hidden_dim=16, mlp_dim=32, num_classes=4)
        nn.init.normal_(model.heads.head.weight)  # torchvision starts the ViT head at zero
    else:
        raise AssertionError(family)
    return model.eval()


def test_every_family_is_covered() -> None:
    assert set(FAMILIES) == {"densenet", "resnet", "convnext", "efficientnet", "vit"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heatmap_shape_range(family: str) -> None:
    model = tiny(family)
    images = torch.randn(3, 3, SIZE, SIZE)
    maps = [gradcam(model, images, k) for k in range(4)]
    for cam in maps:
        assert cam.shape == (3, SIZE, SIZE)
        assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
        # Scaled per image: each map's maximum is 1, or the map is all zero.
        assert all(abs(float(t) - 1) < 1e-5 or float(t) == 0 for t in cam.flatten(1).amax(1))
    # Not degenerate: some class has a map with structure (not constant) on every image.
    assert any(bool((cam.flatten(1).std(1) > 0).all()) for cam in maps)
    if family == "vit":  # the wrapped last block is put back
        assert type(model.encoder.layers[-1]).__name__ == "EncoderBlock"


def test_per_image_targets_and_bad_class() -> None:
    model = tiny("resnet")
    images = torch.randn(2, 3, SIZE, SIZE)
    both = gradcam(model, images, [1, 3])
    torch.testing.assert_close(both[0], gradcam(model, images[:1], 1)[0])
    torch.testing.assert_close(both[1], gradcam(model, images[1:], 3)[0])
    with pytest.raises(ValueError, match="class_index 7 is outside the model's 4 outputs"):
        gradcam(model, images, 7)
    with pytest.raises(ValueError, match="no module 'layer9'"):
        gradcam(model, images, 0, layer="layer9")


def test_matches_grad_cam_definition() -> None:
    """captum's map equals Grad-CAM computed by hand: ReLU(sum_c mean(dy/dA_c) A_c)."""
    model = tiny("densenet")
    images = torch.randn(2, 3, SIZE, SIZE)
    layer = model.get_submodule(default_layer(model))
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        store["a"] = out
        return out.clone()  # DenseNet's forward applies ReLU in place after features

    handle = layer.register_forward_hook(hook)
    logits = model(images)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 2].sum(), store["a"])
    cam = (grad.mean((2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True).clamp(min=0)
    # Upsampled bilinearly between cell centres: torchvision's DenseNet centres cell i of this
    # 8x8 map on pixel 8i + 2 (conv0: 2i, pool0: 4i, the transition's 2x2 average: 8i + 2).
    side = cam.shape[-1]
    weights = torch.tensor(np.stack([np.interp(np.arange(SIZE), 8 * np.arange(side) + 2, row)
                                     for row in np.eye(side)], axis=1), dtype=cam.dtype)
    cam = weights @ cam[:, 0] @ weights.T
    cam = cam / cam.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(gradcam(model, images, 2), cam.detach(), atol=1e-5, rtol=1e-4)


def test_real_densenet121_builds_and_maps() -> None:
    from torchvision.models import get_model

    model = get_model("densenet121", weights=None, num_classes=14).eval()
    cam = gradcam(model, torch.randn(1, 3, SIZE, SIZE), 0)
    assert cam.shape == (1, SIZE, SIZE) and torch.isfinite(cam).all()


def _forwards(model: nn.Module) -> tuple[list[torch.Tensor], object]:
    """Record the input of every forward pass of ``model``; returns the list and the handle."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen, handle


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_spec_saves_the_probe_and_follows_the_model_dtype(family: str) -> None:
    """The probe input follows the model (float64 here; a CPU float32 probe would fail), and a
    spec passed in leaves captum's forward as the only one, with the same maps."""
    model = tiny(family).double()
    images = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    seen, handle = _forwards(model)
    spec = map_spec(model, SIZE)
    assert [(t.dtype, t.device, tuple(t.shape)) for t in seen] == [
        (torch.float64, images.device, (1, 3, SIZE, SIZE))]
    assert spec.classes == 4 and spec.cell_px == (8.0 if family == "vit" else 32.0)
    seen.clear()
    with_spec = gradcam(model, images, 2, spec=spec)
    assert len(seen) == 1
    seen.clear()
    without = gradcam(model, images, 2)
    assert len(seen) == 2  # the probe, then captum's
    handle.remove()
    torch.testing.assert_close(with_spec, without)
    assert with_spec.dtype == torch.float32 and with_spec.device == images.device
    assert cell_size(model, SIZE) == spec.cell_px
    with pytest.raises(ValueError, match="spec was traced at 64x64 px but the images are 32x32"):
        gradcam(model, images[..., :32, :32], 0, spec=spec)
    with pytest.raises(ValueError, match="class_index 4 is outside the model's 4 outputs"):
        gradcam(model, images, 4, spec=spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model() -> None:
    model = tiny("densenet").cuda()
    images = torch.randn(2, 3, SIZE, SIZE, device="cuda")
    spec = map_spec(model, SIZE)
    assert cell_size(model, SIZE) == spec.cell_px == 8.0
    cam = gradcam(model, images, 1, spec=spec)
    assert cam.device.type == "cuda"
    torch.testing.assert_close(cam.cpu(), gradcam(model.cpu(), images.cpu(), 1), atol=1e-4,
                               rtol=1e-3)
