"""Describe a built model for the plan engine (names, shapes, norm layers, blocks)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dist_ft.config.architectures import family_of
from dist_ft.config.schema import ModelConfig
from dist_ft.models.blocks import resolve_block_map
from dist_ft.models.factory import build_model
from dist_ft.models.structure import ModelSpec, NormModule, ParamInfo

_NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def describe_model(model: nn.Module, name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``model``, an instance of the supported architecture ``name``."""
    family = family_of(name)
    params = tuple(ParamInfo(n, tuple(p.shape)) for n, p in model.named_parameters())
    norms = []
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            own = tuple(f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False))
            tracks = isinstance(module, _BatchNorm) and module.track_running_stats
            norms.append(NormModule(mod_name, type(module).__name__, tracks, own))
    blocks = resolve_block_map(family.name, (p.name for p in params))
    return ModelSpec(name=name, params=params, norms=tuple(norms), blocks=blocks, head=family.head)


def model_spec(cfg: ModelConfig) -> ModelSpec:
    """Build the model on the meta device (no weights, no memory) and describe it."""
    return describe_model(build_model(cfg, meta=True), cfg.name)
