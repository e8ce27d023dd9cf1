"""What input a model expects: normalisation and resampling, from the recipe or the model.

torchvision's ImageNet models share one preprocessing (ImageNet mean/std, bilinear); a timm
model has its own in its pretrained config (``timm.data.resolve_data_config``). The recipe's
``data.mean``, ``data.std`` and ``data.interpolation`` override it; the input size is always
``data.image_size``. The data layer receives the result as plain values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dist_ft.config.schema import DataConfig, ModelConfig

log = logging.getLogger(__name__)

# torchvision's ImageNet normalisation (the same numbers as dist_ft.data.transforms', which
# this layer may not import).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputConfig:
    """How images are prepared for a model.

    Attributes:
        mean: per-channel (RGB) mean, 0..1 scale.
        std: per-channel standard deviation.
        interpolation: ``bilinear`` or ``bicubic`` (resize and augmentation warp).
        pretrained_size: the side the model's pretrained weights were trained at (None:
            not known).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    pretrained_size: int | None = None


def model_input_config(model: ModelConfig) -> InputConfig:
    """The model's own preprocessing (before recipe overrides)."""
    if model.source == "timm":
        from dist_ft.models.timm_backbone import timm_input_config

        return timm_input_config(model.arch)
    return InputConfig(TORCHVISION_MEAN, TORCHVISION_STD, "bilinear", None)


def input_config(model: ModelConfig, data: DataConfig) -> InputConfig:
    """The preprocessing a run uses: the recipe's ``data.mean``/``std``/``interpolation``
    where set, else the model's own; logs a warning when ``data.image_size`` differs from
    the size the model was pretrained at."""
    own = model_input_config(model)
    if own.pretrained_size and own.pretrained_size != data.image_size \
            and model.pretrained != "none":
        log.warning("%s was pretrained at %d px; data.image_size is %d", model.name,
                    own.pretrained_size, data.image_size)
    return InputConfig(
        mean=tuple(data.mean) if data.mean is not None else own.mean,
        std=tuple(data.std) if data.std is not None else own.std,
        interpolation=data.interpolation or own.interpolation,
        pretrained_size=own.pretrained_size,
    )
