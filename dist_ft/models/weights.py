"""Pretrained weights: torchvision's ImageNet weights from the local cache, or a state_dict file.

Nothing here downloads: a cluster node often has no internet, and a silent fallback to random
weights wastes a whole run. Missing weights are an error that says how to fetch them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.")
# torchvision's published DenseNet files (densenet121-a639ec97.pth ...) predate its current
# names: 'denselayer1.norm.1.weight' is now 'denselayer1.norm1.weight'. The same rename that
# torchvision's own loader applies (torchvision.models.densenet._load_state_dict).
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class WeightsError(RuntimeError):
    """Pretrained weights could not be found or do not fit the model."""


def imagenet_weights_path(model_name: str) -> Path:
    """Where torch hub keeps torchvision's default ImageNet weights for ``model_name``."""
    weights = get_model_weights(model_name).DEFAULT
    filename = Path(urlparse(weights.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def build_imagenet_model(model_name: str) -> nn.Module:
    """Build ``model_name`` with torchvision's default ImageNet weights, from the cache only.

    Raises:
        WeightsError: the weights file is not in the torch hub cache; the message names the
            file and the command that fetches it on a machine with internet.
    """
    weights = get_model_weights(model_name).DEFAULT
    path = imagenet_weights_path(model_name)
    if not path.is_file():
        raise WeightsError(
            f"model.pretrained=imagenet: {model_name} weights ({weights}) are not cached at "
            f"{path}. dist-ft never downloads during a run. On a machine with internet run\n"
            f"  python -c \"import torchvision; torchvision.models.get_model('{model_name}', "
            f"weights='DEFAULT')\"\n"
            f"and copy {path.name} to {path.parent}/ (or set TORCH_HOME), or download "
            f"{weights.url} there."
        )
    # The file is present, so torchvision's loader reads it without touching the network;
    # going through get_model keeps its key fix-ups (DenseNet's old 'norm.1' names).
    return get_model(model_name, weights=weights)


def _unwrap_state_dict(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        raise WeightsError(f"{source}: not a state_dict (a mapping of names to tensors)")
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        legacy = _LEGACY_DENSENET.match(key)
        if legacy:
            key = legacy.group(1) + legacy.group(2)
        state[key] = value
    return state


def _with_bn_counters(state: dict[str, torch.Tensor],
                      own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files older than BatchNorm's ``num_batches_tracked`` (torchvision's published ones)
    lack it; torch itself accepts that, so it is filled in (0) rather than called missing."""
    counters = {k: torch.zeros_like(v) for k, v in own.items()
                if k.endswith(".num_batches_tracked") and k not in state}
    if counters and not any(k.endswith(".num_batches_tracked") for k in state):
        return {**state, **counters}
    return state


def read_state_dict(path: str | Path, what: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pt``/``.pth`` state_dict safely (no pickle execution).

    Wrappers such as ``{"state_dict": ...}`` and ``module.`` prefixes are removed, and
    torchvision's published DenseNet files (old ``norm.1`` names) are renamed to the current
    names. ``what`` names the file's role in error messages.

    Raises:
        WeightsError: missing, unreadable or not a state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, truncated download ...
        raise WeightsError(f"{what}: cannot read {path}: {exc}") from exc
    return _unwrap_state_dict(obj, path)


def load_weights_strict(model: nn.Module, path: str | Path, *, name: str,
                        num_classes: int) -> None:
    """Load trained weights into ``model``: every tensor present, none extra, same shapes.

    For ``eval`` and ``export``: weights are the result under test, so a head of another size
    is an error, never silently replaced by a random one (that is only for
    ``model.pretrained`` in training, see :func:`load_state_dict_file`).

    Args:
        model: the model the recipe describes (``name``, ``num_classes``), freshly built.
        path: the ``.safetensors`` / ``.pt`` state_dict.
        name: the recipe's ``model.name`` (for the message).
        num_classes: the recipe's ``model.num_classes`` (for the message).

    Raises:
        WeightsError: naming every missing, unexpected or differently-shaped tensor (the
            first few of each), both shapes, and the likely cause.
    """
    own = model.state_dict()
    state = _with_bn_counters(read_state_dict(path, what="weights"), own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or bad):
        model.load_state_dict(state, strict=True)
        return
    problems = []
    if bad:
        problems.append(f"{len(bad)} tensor(s) of another shape: " + "; ".join(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:4]))
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    # A head trained for another class count differs only in the leading (output) dimension
    # of the last tensors; anything else points at another architecture.
    head_like = [k for k in bad if own[k].ndim and state[k].ndim == own[k].ndim
                 and own[k].shape[0] == num_classes and state[k].shape[1:] == own[k].shape[1:]]
    counts = {int(state[k].shape[0]) for k in head_like}
    if head_like == bad and not missing and not unexpected and len(counts) == 1:
        trained = counts.pop()
        cause = (f"Likely cause: the weights have {trained} classes but the recipe's "
                 f"model.num_classes is {num_classes}: pass the --config of the run that "
                 f"trained them, or set model.num_classes={trained}")
    else:
        cause = (f"Likely cause: the weights are not of the recipe's model.name={name} with "
                 f"model.num_classes={num_classes}: pass the --config of the run that "
                 "trained them")
    raise WeightsError(f"weights {path} do not fit the model: " + "; ".join(problems)
                       + f". {cause}")


def load_state_dict_file(model: nn.Module, path: str | Path, head: str) -> list[str]:
    """Load a state_dict file into ``model``; the classifier may be absent or of another size.

    For ``model.pretrained`` in training only (fine-tuning from another task's weights);
    ``eval`` and ``export`` use :func:`load_weights_strict`.

    Every non-classifier tensor must be present with the right shape. When the file's
    classifier is missing or shaped for another number of classes, the model keeps its
    freshly initialised head.

    Returns:
        The names of the head tensors that were kept from initialisation (empty if loaded).

    Raises:
        WeightsError: missing or mis-shaped body tensors, or unexpected extra tensors.
    """
    own = model.state_dict()
    state = _with_bn_counters(read_state_dict(path), own)
    head_keys = [k for k in own if k.startswith(head + ".")]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    if not head_fits:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    problems = []
    missing = [k for k in own if k not in state and (head_fits or k not in head_keys)]
    unexpected = [k for k in state if k not in own]
    bad_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing:
        problems.append(f"missing {len(missing)} tensors (first: {', '.join(missing[:3])})")
    if unexpected:
        first = ", ".join(unexpected[:3])
        problems.append(f"{len(unexpected)} unexpected tensors (first: {first})")
    if bad_shape:
        problems.append("shape mismatch: " + "; ".join(bad_shape[:3]))
    if problems:
        raise WeightsError(
            f"model.pretrained: {path} does not fit the model: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=head_fits)
    kept = [] if head_fits else head_keys
    if kept:
        log.info("%s: loaded without the classifier; %s is newly initialised", path, head)
    return kept
