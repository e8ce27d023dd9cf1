"""Describe a built model for the plan engine (names, shapes, norm layers, blocks)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dist_ft.config.architectures import family_of
from dist_ft.config.schema import TIMM_PREFIX, ModelConfig
from dist_ft.models.blocks import resolve_block_map
from dist_ft.models.factory import build_model
from dist_ft.models.structure import LayerInfo, ModelSpec, NormModule, ParamInfo

_NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)
# Weight layers by kind, most specific first (torchvision's out_proj subclasses nn.Linear).
_LAYER_TYPES = (nn.MultiheadAttention, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def weight_layers(model: nn.Module) -> tuple[LayerInfo, ...]:
    """The model's weight layers (Linear, convolutions, embeddings, attention), in order."""
    out = []
    for mod_name, module in model.named_modules():
        kind = next((t.__name__ for t in _LAYER_TYPES if isinstance(module, t)), None)
        if kind is not None and getattr(module, "groups", 1) > 1:
            kind = f"Grouped{kind}"  # depthwise/grouped: peft neither adapts nor merges it well
        if kind is not None and mod_name:
            out.append(LayerInfo(mod_name, kind))
    return tuple(out)


def describe_model(model: nn.Module, name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``model``, an instance of the architecture ``name`` (a
    recipe's ``model.name``: torchvision's, or ``timm/NAME``), peft adapters possibly
    injected (each adapter parameter in the block of the layer it adapts)."""
    params = tuple(ParamInfo(n, tuple(p.shape)) for n, p in model.named_parameters())
    norms = []
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            own = tuple(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
            tracks = isinstance(module, _BatchNorm) and module.track_running_stats
            norms.append(NormModule(mod_name, type(module).__name__, tracks, own))
    if name.startswith(TIMM_PREFIX):
        from dist_ft.models.timm_backbone import classifier_path, timm_block_map, timm_no_decay

        return ModelSpec(name=name, params=params, norms=tuple(norms),
                         blocks=timm_block_map(model), head=classifier_path(model),
                         layers=weight_layers(model), no_decay=timm_no_decay(model))
    family = family_of(name)
    blocks = resolve_block_map(family.name, (p.name for p in params))
    return ModelSpec(name=name, params=params, norms=tuple(norms), blocks=blocks, head=family.head,
                     layers=weight_layers(model))


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """Build the model on the meta device (no weights, no memory) and describe it."""
    return describe_model(build_model(cfg, meta=True), cfg.name)
