"""Activation checkpointing on an architecture's blocks (trade compute for memory).

Each residual/dense/transformer block's forward runs under ``torch.utils.checkpoint``
(non-reentrant): its activations are recomputed in backward instead of stored. BatchNorm
layers inside a checkpointed block see their forward twice in training mode, so their running
statistics move twice per step (the same trade-off as torchvision's memory-efficient DenseNet).
"""

from __future__ import annotations

import functools
import re

from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_ft.config.architectures import family_of
from dist_ft.config.schema import TIMM_PREFIX


def enable_activation_checkpointing(model: nn.Module, name: str) -> list[str]:
    """Checkpoint every block of ``model`` (architecture ``name``); returns their paths.

    A timm model (``timm/NAME``) checkpoints its own blocks (``set_grad_checkpointing``);
    the paths returned are then the modules that do.
    """
    if name.startswith(TIMM_PREFIX):
        from dist_ft.models.timm_backbone import enable_timm_checkpointing

        return enable_timm_checkpointing(model)
    pattern = re.compile(family_of(name).blocks + "$")
    wrapped = []
    for path, module in model.named_modules():
        if pattern.match(path) and not getattr(module, "_dist_ft_checkpointed", False):
            forward = module.forward

            @functools.wraps(forward)
            def run(*args, _forward=forward, **kwargs):
                if not _forward.__self__.training:
                    return _forward(*args, **kwargs)
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            module.forward = run
            module._dist_ft_checkpointed = True
            wrapped.append(path)
    return wrapped
