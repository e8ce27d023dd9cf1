"""What the plan engine knows of a model: parameter names and shapes, norm layers, blocks.

Built once from a (meta-device) model by :func:`dist_ft.models.spec.describe_model`; everything in
``dist_ft.plan`` works on this description alone, so it needs no weights and no process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dist_ft.models.blocks import BlockMap

BASE_LAYER = "base_layer"  # where peft moves a wrapped layer's own weights


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: its dotted name (as in ``named_parameters``) and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        """Number of dimensions (biases and norm scales have ``ndim <= 1``)."""
        return len(self.shape)


@dataclass(frozen=True)
class NormModule:
    """A normalisation layer and the names of its parameters.

    ``tracks_stats`` is true for BatchNorm-style layers with running statistics: the only
    ones whose train/eval mode changes what a forward pass writes.
    """

    name: str
    kind: str
    tracks_stats: bool
    params: tuple[str, ...]


@dataclass(frozen=True)
class LayerInfo:
    """A layer adapters could wrap: its module path and kind (``Linear``, ``Conv2d``, ...)."""

    name: str
    kind: str


@dataclass(frozen=True)
class ModelSpec:
    """A model's structure as the plan engine sees it.

    ``layers`` lists the model's weight layers by kind (what adapter targets resolve to);
    ``no_decay`` names parameters the model itself exempts from weight decay (timm's
    ``no_weight_decay()``: position embeddings, class tokens).
    """

    name: str
    params: tuple[ParamInfo, ...]
    norms: tuple[NormModule, ...]
    blocks: BlockMap
    head: str
    layers: tuple[LayerInfo, ...] = ()
    no_decay: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Total number of parameter elements."""
        return sum(p.numel for p in self.params)


@dataclass(frozen=True)
class ResolvedAdapters:
    """A stage's adapters: their kind and hyper-parameters, and the layers they wrap.

    Two stages keep the same adapters exactly when their ``ResolvedAdapters`` are equal.
    """

    kind: str
    r: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """A JSON form for the plan digest (floats exact, as ``float.hex``)."""
        return {"kind": self.kind, "r": self.r, "alpha": float(self.alpha).hex(),
                "dropout": float(self.dropout).hex(), "modules": list(self.modules)}

    def adapted_name(self, name: str) -> str:
        """The name of base parameter ``name`` once the adapters are injected."""
        module, _, leaf = name.rpartition(".")
        return f"{module}.{BASE_LAYER}.{leaf}" if module in self.modules else name
