"""Per-architecture block maps: every parameter assigned to one named, ordered block.

A block map is what the freeze plan's shorthands (``head``, ``last_blocks: 2``,
``from_block: layer3``) and layer-wise lr decay are resolved against. Its order is
``stem``, the body blocks in forward order, then ``head``; the depth of block ``k`` is its
index, so ``stem`` is 0 and ``head`` is ``len(blocks) - 1``. Final norms that sit between
the last body block and the classifier (DenseNet's ``norm5``, ViT's ``encoder.ln``) belong to
the last body block, as in timm's group matchers.

Pure: works on parameter names only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

STEM = "stem"
HEAD = "head"
_LAST = "@last"  # "the body block seen most recently"

# A rule maps a parameter name to its block: (regex, block name from the match).
_Rule = tuple["re.Pattern[str]", Callable[["re.Match[str]"], str]]


def _r(pattern: str, name: str | Callable[[re.Match[str]], str]) -> _Rule:
    fn = name if callable(name) else (lambda m, _n=name: m.expand(_n))
    return re.compile(pattern), fn


def _convnext_stage(m: re.Match[str]) -> str:
    # features.1,3,5,7 are stages; features.2,4,6 are the downsamplers that open the next one.
    return f"stage{(int(m.group(1)) + 1) // 2}"


_FAMILY_RULES: dict[str, list[_Rule]] = {
    "resnet": [
        _r(r"^(conv1|bn1)\.", STEM),
        _r(r"^(layer\d+)\.", r"\1"),
        _r(r"^fc\.", HEAD),
    ],
    "densenet": [
        _r(r"^features\.(conv0|norm0)\.", STEM),
        _r(r"^features\.(denseblock\d+)\.", r"\1"),
        _r(r"^features\.transition(\d+)\.", r"denseblock\1"),
        _r(r"^features\.norm5\.", _LAST),
        _r(r"^classifier\.", HEAD),
    ],
    "efficientnet": [
        _r(r"^features\.0\.", STEM),
        _r(r"^features\.([1-7])\.", r"stage\1"),
        _r(r"^features\.8\.", _LAST),
        _r(r"^classifier\.", HEAD),
    ],
    "convnext": [
        _r(r"^features\.0\.", STEM),
        _r(r"^features\.([1-7])\.", _convnext_stage),
        _r(r"^classifier\.0\.", _LAST),
        _r(r"^classifier\.2\.", HEAD),
    ],
    "vit": [
        _r(r"^(class_token$|conv_proj\.|encoder\.pos_embedding$)", STEM),
        _r(r"^encoder\.layers\.(encoder_layer_\d+)\.", r"\1"),
        _r(r"^encoder\.ln\.", _LAST),
        _r(r"^heads\.", HEAD),
    ],
}


@dataclass(frozen=True)
class BlockMap:
    """Ordered blocks of one model and the block of every parameter.

    Attributes:
        blocks: block names, ``stem`` first, ``head`` last.
        block_of: parameter name -> block name.
    """

    blocks: tuple[str, ...]
    block_of: dict[str, str]

    @property
    def body(self) -> tuple[str, ...]:
        """The blocks between ``stem`` and ``head``."""
        return self.blocks[1:-1]

    @property
    def depth(self) -> int:
        """Index of ``head``: the exponent base of layer-wise lr decay."""
        return len(self.blocks) - 1

    def index(self, block: str) -> int:
        """Position of ``block`` (``stem`` = 0, ``head`` = ``depth``)."""
        return self.blocks.index(block)


def resolve_block_map(family: str, param_names: Iterable[str]) -> BlockMap:
    """Assign each parameter (in model order) to a block of its architecture family.

    Raises:
        ValueError: unknown family, or a parameter no rule covers (a torchvision layout
            change that the block map must learn about).
    """
    if family not in _FAMILY_RULES:
        raise ValueError(f"no block map for architecture family {family!r}")
    rules = _FAMILY_RULES[family]
    block_of: dict[str, str] = {}
    body: list[str] = []
    for name in param_names:
        for pattern, fn in rules:
            m = pattern.search(name)
            if m is None:
                continue
            block = fn(m)
            if block == _LAST:
                if not body:
                    raise ValueError(f"{name}: final-norm parameter before any body block")
                block = body[-1]
            elif block not in (STEM, HEAD) and block not in body:
                body.append(block)
            block_of[name] = block
            break
        else:
            raise ValueError(f"{family} block map has no rule for parameter {name!r}")
    return BlockMap(blocks=(STEM, *body, HEAD), block_of=block_of)
