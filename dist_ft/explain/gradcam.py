"""Grad-CAM heatmaps (captum's ``LayerGradCam``) for every architecture family dist-ft trains.

The layer is the last one with a spatial grid, found from the model's class:

- DenseNet: ``features`` (after ``norm5``; torchvision applies the final ReLU in ``forward``);
- ResNet: ``layer4``; ConvNeXt and EfficientNet: ``features``;
- ViT: the tokens entering the last encoder block, class token dropped, as a ``[B, D, h, w]``
  patch grid. (The last block's *output* patch tokens are not used: after it only the class
  token reaches the head, so their gradient is zero.)

The map is ReLU'd, upsampled bilinearly to the input size and scaled to [0, 1] per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["default_layer", "gradcam"]


class _TokenGrid(nn.Module):
    """Wraps a ViT encoder block: its input tokens pass through ``grid`` as ``[B, D, h, w]``.

    ``grid`` is an identity that captum hooks; the block itself runs unchanged.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.grid = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + h*w, D]`` -> the block's output, with the patch tokens routed via grid."""
        b, n, d = tokens.shape
        side = round((n - 1) ** 0.5)
        if side * side != n - 1:
            raise ValueError(f"ViT Grad-CAM: {n - 1} patch tokens do not form a square grid")
        patches = tokens[:, 1:].transpose(1, 2).reshape(b, d, side, side)
        patches = self.grid(patches).reshape(b, d, n - 1).transpose(1, 2)
        return self.block(torch.cat([tokens[:, :1], patches], dim=1))


@contextlib.contextmanager
def _vit_grid(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily wrap the last encoder block of a torchvision ViT; yield the grid layer."""
    layers = model.encoder.layers
    last = layers[-1]
    wrapper = _TokenGrid(last)
    layers[-1] = wrapper
    try:
        yield wrapper.grid
    finally:
        layers[-1] = last


def _family(model: nn.Module) -> str:
    from torchvision.models import ConvNeXt, DenseNet, EfficientNet, ResNet, VisionTransformer

    for cls, name in ((DenseNet, "densenet"), (ResNet, "resnet"), (ConvNeXt, "convnext"),
                      (EfficientNet, "efficientnet"), (VisionTransformer, "vit")):
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"Grad-CAM: no default layer for {type(model).__name__}; supported: DenseNet, ResNet, "
        "ConvNeXt, EfficientNet, VisionTransformer (torchvision). Pass layer= (a module of "
        "the model, or its dotted path) whose output is [B, C, h, w]")


def default_layer(model: nn.Module) -> str:
    """The dotted path of the layer Grad-CAM uses for ``model`` by default.

    ``encoder.layers[-1]`` for a ViT means the tokens *entering* that block (see the module
    docstring).

    Raises:
        ValueError: ``model`` is of no supported torchvision family.
    """
    return {"densenet": "features", "resnet": "layer4", "convnext": "features",
            "efficientnet": "features", "vit": "encoder.layers[-1]"}[_family(model)]


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map by its maximum (an all-zero map stays zero)."""
    cam = cam.clamp(min=0)
    top = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(top > 0, cam / top.clamp(min=torch.finfo(cam.dtype).tiny), 0.0)


def gradcam(model: nn.Module, images: torch.Tensor, class_index: int | Sequence[int],
            layer: nn.Module | str | None = None) -> torch.Tensor:
    """Grad-CAM heatmaps of ``class_index`` for a batch of preprocessed images.

    Args:
        model: a classifier (eval mode is kept as is; parameters need not require grad).
        images: ``[B, C, H, W]`` float, as the model takes them (resized and normalised).
        class_index: the output to explain: one index for all images, or one per image.
        layer: the layer whose activations are weighted: a module of ``model`` or its dotted
            path; default :func:`default_layer`.

    Returns:
        ``[B, H, W]`` float heatmaps in [0, 1] (each image's maximum is 1 unless the map is
        all zero), on the images' device.

    Raises:
        ValueError: no default layer for the model, a path that names no module, or a
            ``class_index`` outside the model's outputs.
    """
    from captum.attr import LayerGradCam

    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    targets = ([int(class_index)] * images.shape[0] if isinstance(class_index, int)
               else [int(k) for k in class_index])
    if len(targets) != images.shape[0]:
        raise ValueError(f"class_index has {len(targets)} entries for {images.shape[0]} images")
    is_vit = layer in (None, "encoder.layers[-1]") and _family(model) == "vit"
    with contextlib.ExitStack() as stack:
        if is_vit:
            module = stack.enter_context(_vit_grid(model))
        else:
            module = _resolve_layer(model, layer if layer is not None else default_layer(model))
        inputs = images.detach().clone().requires_grad_(True)
        with torch.no_grad():
            classes = model(inputs[:1]).shape[-1]
        bad = [k for k in targets if not 0 <= k < classes]
        if bad:
            raise ValueError(f"class_index {bad[0]} is outside the model's {classes} outputs")
        with torch.enable_grad():
            cam = LayerGradCam(model, module).attribute(inputs, target=targets,
                                                        relu_attributions=True)
    cam = F.interpolate(cam.detach().float(), size=images.shape[-2:], mode="bilinear",
                        align_corners=False)
    return _normalise(cam[:, 0])


def _resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    path = layer.replace("[", ".").replace("]", "")
    module: nn.Module = model
    for part in path.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"Grad-CAM layer {layer!r}: {type(model).__name__} has no module "
                             f"{part!r} there") from None
    return module
