"""Which torchvision architectures dist-ft knows, and how each family is laid out.

Pure data: no torch import, so config validation and ``dist-ft plan`` stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Facts shared by one torchvision architecture family.

    Attributes:
        name: family key (``resnet``, ``densenet`` ...).
        head: module path of the classifier layer that ``num_classes`` replaces.
        blocks: regex of the module paths of the body blocks (activation checkpointing units).
    """

    name: str
    head: str
    blocks: str


FAMILIES: dict[str, Family] = {
    "resnet": Family("resnet", head="fc", blocks=r"layer\d+\.\d+"),
    "densenet": Family("densenet", head="classifier",
                       blocks=r"features\.denseblock\d+"),  # dense layers mutate a list
    "efficientnet": Family("efficientnet", head="classifier.1", blocks=r"features\.[1-7]\.\d+"),
    "convnext": Family("convnext", head="classifier.2", blocks=r"features\.[1357]\.\d+"),
    "vit": Family("vit", head="heads.head", blocks=r"encoder\.layers\.encoder_layer_\d+"),
}

# torchvision model name -> family. Every name here has a block map (models/blocks.py).
ARCHITECTURES: dict[str, str] = {
    **{n: "resnet" for n in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
        "wide_resnet50_2", "wide_resnet101_2",
    )},
    **{n: "densenet" for n in ("densenet121", "densenet161", "densenet169", "densenet201")},
    **{f"efficientnet_b{i}": "efficientnet" for i in range(8)},
    **{f"convnext_{s}": "convnext" for s in ("tiny", "small", "base", "large")},
    **{n: "vit" for n in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}


def family_of(model_name: str) -> Family:
    """Return the family of a supported model name.

    Raises:
        KeyError: the name is not a supported architecture.
    """
    return FAMILIES[ARCHITECTURES[model_name]]
