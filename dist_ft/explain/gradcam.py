"""Grad-CAM heatmaps (captum's ``LayerGradCam``) for every architecture family dist-ft trains.

The layer is the last one with a spatial grid, found from the model's class:

- DenseNet: ``features`` (after ``norm5``; torchvision applies the final ReLU in ``forward``);
- ResNet: ``layer4``; ConvNeXt and EfficientNet: ``features``;
- timm models: the module of their last feature map (``feature_info[-1]``: ``stages.3``,
  ``blocks.6``); timm ViT/DeiT-like models (``blocks`` of tokens) as torchvision's ViT;
- ViT: the tokens entering the last encoder block, class token dropped, as a ``[B, D, h, w]``
  patch grid. (The last block's *output* patch tokens are not used: after it only the class
  token reaches the head, so their gradient is zero.)

The map is ReLU'd, upsampled bilinearly to the input size and scaled to [0, 1] per image.

Upsampling puts each map cell where its receptive field is centred, not at the centre of an
even tiling (what ``F.interpolate(..., align_corners=False)`` and captum's
``LayerAttribution.interpolate`` assume). The two differ for strided convolutions and poolings
with padding: ResNet's and EfficientNet's stride-32 maps are centred at ``32 i``, not
``32 i + 15.5`` (half a cell off), DenseNet-121's at ``32 i + 14``. :func:`map_geometry` traces
the stride and offset through every ``conv2d``/``max_pool2d``/``avg_pool2d`` of the forward
pass (a ``TorchFunctionMode``; weights do not matter); where it cannot (a ViT's tokens reshaped
to a grid, an adaptive pooling), the even tiling is assumed, which is exact for ViT's patches.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Axis", "MapSpec", "cell_size", "default_layer", "gradcam", "map_geometry", "map_spec",
           "model_device_dtype", "upsample"]

# One spatial axis of a feature map: cell i is centred on input pixel ``stride * i + offset``
# (pixel j spans [j - 0.5, j + 0.5]).
Axis = tuple[float, float]


class _TokenGrid(nn.Module):
    """Wraps a ViT encoder block: its input tokens pass through ``grid`` as ``[B, D, h, w]``.

    ``grid`` is an identity that captum hooks; the block itself runs unchanged.
    """

    def __init__(self, block: nn.Module, prefix: int = 1) -> None:
        super().__init__()
        self.block, self.prefix = block, prefix  # prefix: class (and register) tokens
        self.grid = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, prefix + h*w, D]`` -> the block's output, the patch tokens routed via grid."""
        b, n, d = tokens.shape
        k = self.prefix
        side = round((n - k) ** 0.5)
        if side * side != n - k:
            raise ValueError(f"ViT Grad-CAM: {n - k} patch tokens do not form a square grid")
        patches = tokens[:, k:].transpose(1, 2).reshape(b, d, side, side)
        patches = self.grid(patches).reshape(b, d, n - k).transpose(1, 2)
        return self.block(torch.cat([tokens[:, :k], patches], dim=1))


@contextlib.contextmanager
def _vit_grid(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily wrap the last encoder block of a ViT (torchvision's or timm's); yield the
    grid layer."""
    timm_vit = _family(model) == "timm_vit"
    layers = model.blocks if timm_vit else model.encoder.layers
    last = layers[-1]
    wrapper = _TokenGrid(last, model.num_prefix_tokens if timm_vit else 1)
    layers[-1] = wrapper
    try:
        yield wrapper.grid
    finally:
        layers[-1] = last


def _family(model: nn.Module) -> str:
    from torchvision.models import ConvNeXt, DenseNet, EfficientNet, ResNet, VisionTransformer

    from dist_ft.models.timm_backbone import is_timm_model

    if is_timm_model(model):
        # timm's ViT-likes run token blocks after a patch embedding; the rest have a grid.
        tokens = all(hasattr(model, a) for a in ("num_prefix_tokens", "blocks", "patch_embed"))
        return "timm_vit" if tokens else "timm"

    for cls, name in ((DenseNet, "densenet"), (ResNet, "resnet"), (ConvNeXt, "convnext"),
                      (EfficientNet, "efficientnet"), (VisionTransformer, "vit")):
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"Grad-CAM: no default layer for {type(model).__name__}; supported: DenseNet, ResNet, "
        "ConvNeXt, EfficientNet, VisionTransformer (torchvision) and timm models. Pass layer= "
        "(a module of the model, or its dotted path) whose output is [B, C, h, w]")


def default_layer(model: nn.Module) -> str:
    """The dotted path of the layer Grad-CAM uses for ``model`` by default.

    ``encoder.layers[-1]`` for a ViT (``blocks[-1]`` for timm's) means the tokens *entering*
    that block (see the module docstring). A timm CNN's is the module of its last feature map.

    Raises:
        ValueError: ``model`` is of no supported family.
    """
    family = _family(model)
    if family == "timm":
        return model.feature_info[-1]["module"]
    return {"densenet": "features", "resnet": "layer4", "convnext": "features",
            "efficientnet": "features", "vit": "encoder.layers[-1]",
            "timm_vit": "blocks[-1]"}[family]


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """ReLU, then divide each map by its maximum (an all-zero map stays zero)."""
    cam = cam.clamp(min=0)
    top = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(top > 0, cam / top.clamp(min=torch.finfo(cam.dtype).tiny), 0.0)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _conv_args(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """``(kernel, stride, padding, dilation)`` of a ``conv2d`` call, each a pair."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    kernel = tuple(bound["weight"].shape[-2:])
    stride, dilation = _pair(bound.get("stride", 1)), _pair(bound.get("dilation", 1))
    padding = bound.get("padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same":  # torch pads the odd extra pixel on the far side
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    return kernel, stride, _pair(padding), dilation


def _pool_args(args: tuple, kwargs: dict, max_pool: bool) -> tuple[Any, ...]:
    """``(kernel, stride, padding, dilation)`` of a ``max_pool2d``/``avg_pool2d`` call."""
    names = ("input", "kernel_size", "stride", "padding", *(("dilation",) if max_pool else ()))
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    kernel = _pair(bound["kernel_size"])
    stride = bound.get("stride")
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    return kernel, stride, _pair(bound.get("padding", 0)), _pair(bound.get("dilation", 1))


def _tensors(args: tuple) -> Iterator[torch.Tensor]:
    """The tensors among ``args``, looking one level into lists (``cat``'s first argument)."""
    for arg in args:
        if isinstance(arg, (list, tuple)):
            yield from (a for a in arg if isinstance(a, torch.Tensor))
        elif isinstance(arg, torch.Tensor):
            yield arg


class _GeometryMode(torch.overrides.TorchFunctionMode):
    """Follows which input pixel each cell of every 4-d activation is centred on.

    A tensor's geometry is ``(h_axis, w_axis, Axis, Axis)``. ``conv2d`` and the two strided
    poolings compose it (cell ``i`` of ``kernel k, stride s, padding p, dilation d`` is centred
    on input cell ``s i - p + d (k - 1) / 2``); ``permute`` moves the axes (ConvNeXt's
    channels-last blocks); any other op passes its first traced input's geometry on when the
    output keeps that input's rank and spatial sizes (norms, activations, ``cat``, residual
    sums), and drops it otherwise (flatten, adaptive pooling, interpolation).
    """

    _DROP = ("adaptive", "interpolate", "upsample", "grid_sample", "pixel_shuffle", "unfold")

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self._geometry: dict[int, tuple[weakref.ref, tuple]] = {}
        self.record(images, (2, 3, (1.0, 0.0), (1.0, 0.0)))

    def record(self, tensor: torch.Tensor, geometry: tuple) -> None:
        self._geometry[id(tensor)] = (weakref.ref(tensor), geometry)

    def lookup(self, tensor: Any) -> tuple | None:
        entry = self._geometry.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        result = out[0] if isinstance(out, tuple) and out else out
        if not isinstance(result, torch.Tensor) or result.ndim < 3:
            return out
        source = self.lookup(args[0]) if args else None
        name = getattr(func, "__name__", "")
        if func is F.conv2d or func is F.max_pool2d or func is F.avg_pool2d:
            if source is not None and source[:2] == (result.ndim - 2, result.ndim - 1):
                kernel, stride, padding, dilation = (
                    _conv_args(args, kwargs) if func is F.conv2d
                    else _pool_args(args, kwargs, max_pool=func is F.max_pool2d))
                axes = [(step * s, offset + step * (d * (k - 1) / 2 - p))
                        for (step, offset), k, s, p, d in zip(
                            source[2:], kernel, stride, padding, dilation, strict=True)]
                self.record(result, (*source[:2], *axes))
        elif name == "permute" and source is not None:
            dims = args[1:] if len(args) > 2 else args[1] if len(args) > 1 else kwargs["dims"]
            dims = [int(d) % result.ndim for d in dims]
            self.record(result, (dims.index(source[0]), dims.index(source[1]), *source[2:]))
        elif not any(word in name for word in self._DROP):
            for arg in _tensors(args):
                found = self.lookup(arg)
                if (found is not None and arg.ndim == result.ndim
                        and all(arg.shape[a] == result.shape[a] for a in found[:2])):
                    self.record(result, found)
                    break
        return out


def _trace(model: nn.Module, images: torch.Tensor,
           layer: nn.Module | None) -> tuple[int, tuple[Axis, Axis] | None]:
    """One no-grad forward of ``images``: the model's output count and ``layer``'s geometry.

    ``layer=None`` skips the tracing (a ViT's token grid, whose tiling is even) and only
    counts the outputs.
    """
    if layer is None:
        with torch.no_grad():
            return int(model(images).shape[-1]), None
    seen: list[tuple | None] = []
    mode = _GeometryMode(images)

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        found = mode.lookup(output)
        seen.append(found if found is not None and found[:2] == (2, 3) else None)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad(), mode:
            classes = int(model(images).shape[-1])
    finally:
        handle.remove()
    if not seen or seen[-1] is None:
        return classes, None
    return classes, (seen[-1][2], seen[-1][3])


def map_geometry(model: nn.Module, images: torch.Tensor,
                 layer: nn.Module) -> tuple[Axis, Axis] | None:
    """Where ``layer``'s output cells sit on the input: ``((stride, offset) of y, of x)``.

    Runs ``model`` once on ``images`` (no gradient) while tracing strides and paddings (see
    :class:`_GeometryMode`); the weights play no part.

    Args:
        model: the classifier.
        images: a preprocessed batch (one image is enough), on the model's device and dtype.
        layer: a module of ``model`` whose output is ``[B, C, h, w]``.

    Returns:
        Per axis ``(stride, offset)``: cell ``i`` is centred on input pixel
        ``stride * i + offset``; ``None`` when the layer's grid is not traceable to the input.
    """
    return _trace(model, images, layer)[1]


@dataclass(frozen=True)
class MapSpec:
    """What Grad-CAM needs to know of a (model, layer, input size) besides the images.

    Computed once by :func:`map_spec` and passed to :func:`gradcam` for every batch, so a
    batch costs no extra forward pass.

    Attributes:
        size: ``(H, W)`` of the input it was traced at.
        classes: the model's number of outputs.
        geometry: the layer's cell centres (:func:`map_geometry`), ``None`` for an even tiling.
        cell_px: input pixels between two cells (largest stride; a ViT's patch size), ``None``
            when unknown.
    """

    size: tuple[int, int]
    classes: int
    geometry: tuple[Axis, Axis] | None
    cell_px: float | None


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype an input must have to run through ``model``.

    Those of its first floating parameter (or buffer); the default dtype on the CPU for a
    model without weights.

    Args:
        model: any module.

    Returns:
        ``(device, dtype)``.
    """
    tensors = [*model.parameters(), *model.buffers()]
    floating = [t for t in tensors if t.is_floating_point()]
    if floating:
        return floating[0].device, floating[0].dtype
    # No float weights (a parameter-free model): the default dtype, on the weights' device.
    return (tensors[0].device if tensors else torch.device("cpu")), torch.get_default_dtype()


def _spec(model: nn.Module, probe: torch.Tensor, module: nn.Module, is_vit: bool) -> MapSpec:
    """:class:`MapSpec` from one forward of ``probe`` (``[1, C, H, W]``)."""
    classes, geometry = _trace(model, probe, None if is_vit else module)
    if is_vit:
        patch = getattr(model, "patch_size", None) or model.patch_embed.patch_size
        cell: float | None = float(patch if isinstance(patch, int) else patch[0])
    else:
        cell = None if geometry is None else float(max(axis[0] for axis in geometry))
    return MapSpec((int(probe.shape[-2]), int(probe.shape[-1])), classes, geometry, cell)


def _is_vit_grid(model: nn.Module, layer: nn.Module | str | None) -> bool:
    """Whether Grad-CAM uses a ViT's token grid (the default layer of a ViT)."""
    return layer in (None, "encoder.layers[-1]", "blocks[-1]") \
        and _family(model) in ("vit", "timm_vit")


def map_spec(model: nn.Module, size: int | tuple[int, int], channels: int = 3,
             layer: nn.Module | str | None = None) -> MapSpec:
    """Output count and map geometry of ``model`` at an input size, from one forward pass.

    The probe input is zeros on the device and in the dtype of the model's parameters (the
    weights play no part in the geometry).

    Args:
        model: the classifier.
        size: the input side, or ``(H, W)``.
        channels: the channels the model takes (3 after :class:`BatchNormalize`).
        layer: Grad-CAM's layer, as for :func:`gradcam`.

    Returns:
        The spec to pass to :func:`gradcam` for inputs of that size.

    Raises:
        ValueError: no default layer for the model, or a path that names no module.
    """
    height, width = _pair(size)
    device, dtype = model_device_dtype(model)
    probe = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
    is_vit = _is_vit_grid(model, layer)
    module = model if is_vit else _resolve_layer(
        model, layer if layer is not None else default_layer(model))
    return _spec(model, probe, module, is_vit)


def upsample(cam: torch.Tensor, size: tuple[int, int],
             geometry: tuple[Axis, Axis] | None = None) -> torch.Tensor:
    """Bilinear ``[B, 1, h, w]`` -> ``[B, 1, H, W]``, each cell at its receptive field's centre.

    Args:
        cam: the map at the layer's resolution.
        size: ``(H, W)`` of the input.
        geometry: from :func:`map_geometry`; ``None`` assumes the cells tile the input evenly
            (cell ``i`` centred on ``(i + 0.5) H / h - 0.5``, as ``align_corners=False``).

    Returns:
        The map at the input's resolution; beyond the outermost cell centres the border value
        is repeated (as ``F.interpolate`` does).
    """
    (h, w), (out_h, out_w) = cam.shape[-2:], size
    if geometry is None:
        geometry = ((out_h / h, out_h / h / 2 - 0.5), (out_w / w, out_w / w / 2 - 0.5))
    coords = []
    for (stride, offset), cells, pixels in zip(geometry, (h, w), (out_h, out_w), strict=True):
        cell = (torch.arange(pixels, dtype=torch.float64, device=cam.device) - offset) / stride
        coords.append((2 * cell / (cells - 1) - 1) if cells > 1 else torch.zeros_like(cell))
    grid_y, grid_x = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).to(cam.dtype).expand(cam.shape[0], -1, -1, -1)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)


def gradcam(model: nn.Module, images: torch.Tensor, class_index: int | Sequence[int],
            layer: nn.Module | str | None = None, *,
            spec: MapSpec | None = None) -> torch.Tensor:
    """Grad-CAM heatmaps of ``class_index`` for a batch of preprocessed images.

    Args:
        model: a classifier (eval mode is kept as is; parameters need not require grad).
        images: ``[B, C, H, W]`` float, as the model takes them (resized and normalised), on
            the model's device and in its dtype.
        class_index: the output to explain: one index for all images, or one per image.
        layer: the layer whose activations are weighted: a module of ``model`` or its dotted
            path; default :func:`default_layer`.
        spec: :func:`map_spec` of this model and layer at the images' size; computed here
            (one extra forward of one image) when not given. Pass it when mapping many
            batches.

    Returns:
        ``[B, H, W]`` float32 heatmaps in [0, 1] (each image's maximum is 1 unless the map is
        all zero), on the images' device.

    Raises:
        ValueError: no default layer for the model, a path that names no module, a
            ``class_index`` outside the model's outputs, or a ``spec`` of another size.
    """
    from captum.attr import LayerGradCam

    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    targets = ([int(class_index)] * images.shape[0] if isinstance(class_index, int)
               else [int(k) for k in class_index])
    if len(targets) != images.shape[0]:
        raise ValueError(f"class_index has {len(targets)} entries for {images.shape[0]} images")
    size = (int(images.shape[-2]), int(images.shape[-1]))
    if spec is not None and spec.size != size:
        raise ValueError(f"spec was traced at {spec.size[0]}x{spec.size[1]} px but the images "
                         f"are {size[0]}x{size[1]}; call map_spec(model, {size}) for them")
    is_vit = _is_vit_grid(model, layer)
    with contextlib.ExitStack() as stack:
        if is_vit:
            module = stack.enter_context(_vit_grid(model))
        else:
            module = _resolve_layer(model, layer if layer is not None else default_layer(model))
        if spec is None:
            spec = _spec(model, images[:1].detach(), module, is_vit)
        bad = [k for k in targets if not 0 <= k < spec.classes]
        if bad:
            raise ValueError(f"class_index {bad[0]} is outside the model's {spec.classes} "
                             "outputs")
        inputs = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            cam = LayerGradCam(model, module).attribute(inputs, target=targets,
                                                        relu_attributions=True)
    cam = upsample(cam.detach().float(), size, spec.geometry)
    return _normalise(cam[:, 0])


def cell_size(model: nn.Module, image_size: int, channels: int = 3,
              layer: nn.Module | str | None = None) -> float | None:
    """Input pixels between two cells of the map Grad-CAM weights (its resolution), at
    ``image_size``: 32 for a ResNet's ``layer4``, a ViT's patch size. None when unknown.

    A heatmap cannot place a peak more finely than this, so boxes smaller than it cannot be
    localized whatever the model learned (the localization report says so). Runs one forward
    pass on the model's device (:func:`map_spec`'s ``cell_px``).
    """
    return map_spec(model, image_size, channels, layer).cell_px


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
