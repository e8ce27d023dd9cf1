"""Model descriptions shipped with dist-ft, so ``dist-ft plan`` answers without importing torch.

Importing torch and torchvision costs about 5 s on a small CPU machine, longer than planning
itself. ``specs.json.gz`` holds, for every supported architecture, the parameter names and
shapes and norm layers of a meta-device build made with the torchvision version it records.
When the installed torchvision is that version the table is used (head shapes adjusted to
``num_classes``); otherwise the model is built on the meta device as usual. The trainer always
describes the real model it trains, and the test suite checks that the table matches fresh
builds.

timm models (``model.name: timm/NAME``) are never in the table: timm has over a thousand
architectures and changes them between releases, so their spec always comes from a meta-device
build of the installed timm (about a second).

Regenerate after a torchvision upgrade: ``python -m dist_ft.models.spec_cache``.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from dist_ft.config.architectures import ARCHITECTURES, family_of
from dist_ft.config.schema import ModelConfig
from dist_ft.models.blocks import resolve_block_map
from dist_ft.models.structure import LayerInfo, ModelSpec, NormModule, ParamInfo

SPECS_FILE = Path(__file__).with_name("specs.json.gz")


def torchvision_version() -> str:
    """The installed torchvision release, without a local build tag (``0.29.1``)."""
    return version("torchvision").split("+")[0]


def _series(release: str) -> str:
    """``0.29.2`` -> ``0.29``."""
    return ".".join(release.split(".")[:2])


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    """A compact JSON form of a :class:`ModelSpec` (the block map is recomputed on load)."""
    return {
        "head": spec.head,
        "params": [[p.name, list(p.shape)] for p in spec.params],
        "norms": [[n.name, n.kind, n.tracks_stats, list(n.params)] for n in spec.norms],
        "layers": [[la.name, la.kind] for la in spec.layers],
    }


def spec_from_json(name: str, data: dict[str, Any], num_classes: int) -> ModelSpec:
    """Rebuild a :class:`ModelSpec`, resizing the classifier's output dimension."""
    head_prefix = data["head"] + "."
    params = tuple(
        ParamInfo(n, (num_classes, *s[1:]) if n.startswith(head_prefix) else tuple(s))
        for n, s in data["params"]
    )
    norms = tuple(NormModule(n, k, t, tuple(p)) for n, k, t, p in data["norms"])
    blocks = resolve_block_map(family_of(name).name, (p.name for p in params))
    layers = tuple(LayerInfo(n, k) for n, k in data.get("layers", ()))
    return ModelSpec(name=name, params=params, norms=norms, blocks=blocks, head=data["head"],
                     layers=layers)


@cache
def _shipped() -> dict[str, Any]:
    try:
        with gzip.open(SPECS_FILE, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except OSError:
        return {}


def shipped_spec(cfg: ModelConfig) -> ModelSpec | None:
    """The shipped spec for ``cfg``, or None when absent (every timm model) or made with
    another torchvision."""
    table = _shipped()
    # Architectures do not change within a release series (0.29.x); tests/models/test_blocks.py
    # checks the table against fresh builds of whatever torchvision is installed.
    if _series(table.get("torchvision", "")) != _series(torchvision_version()) \
            or cfg.name not in table["models"]:
        return None
    return spec_from_json(cfg.name, table["models"][cfg.name], cfg.num_classes)


def fast_model_spec(cfg: ModelConfig) -> ModelSpec:
    """The model's spec from the shipped table where valid, else from a meta-device build."""
    spec = shipped_spec(cfg)
    if spec is None:
        from dist_ft.models.spec import model_spec

        spec = model_spec(cfg)
    return spec


def write_specs(path: Path = SPECS_FILE) -> None:
    """Build every supported architecture on the meta device and write the table."""
    from dist_ft.models.spec import model_spec

    models = {
        name: spec_to_json(model_spec(ModelConfig(name=name, num_classes=1000)))
        for name in sorted(ARCHITECTURES)
    }
    doc = {"torchvision": torchvision_version(), "models": models}
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as fh:
        fh.write(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
    tmp.replace(path)


if __name__ == "__main__":
    write_specs()
    print(f"wrote {SPECS_FILE} for torchvision {torchvision_version()}")
