"""Build classifiers (torchvision's, or timm's through ``timm_backbone``) with a head sized for
the task and the chosen weights."""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model

from dist_ft.config.architectures import family_of
from dist_ft.config.schema import ModelConfig
from dist_ft.models.weights import build_imagenet_model, load_state_dict_file


def _resize_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Replace the ``nn.Linear`` at module path ``head`` with one of ``num_classes`` outputs."""
    parent_path, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{head} is {type(old).__name__}, expected nn.Linear")
    if old.out_features == num_classes:
        return
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def build_model(cfg: ModelConfig, *, meta: bool = False) -> nn.Module:
    """Build the model a recipe's ``model`` section describes.

    Args:
        cfg: the ``model`` section.
        meta: build on the meta device, without weights (for planning: shapes only).

    Raises:
        dist_ft.models.weights.WeightsError: the requested weights are missing or do not fit.
        dist_ft.config.ConfigError: timm does not know the model (``source: timm``).
    """
    if cfg.source == "timm":
        from dist_ft.models.timm_backbone import build_timm_model

        return build_timm_model(cfg, meta=meta)
    family = family_of(cfg.name)
    if meta:
        import torch

        with torch.device("meta"):
            return get_model(cfg.name, weights=None, num_classes=cfg.num_classes)
    if cfg.pretrained == "imagenet":
        model = build_imagenet_model(cfg.name)
        _resize_head(model, family.head, cfg.num_classes)
        return model
    model = get_model(cfg.name, weights=None, num_classes=cfg.num_classes)
    if cfg.pretrained != "none":
        load_state_dict_file(model, cfg.pretrained, family.head)
    return model
