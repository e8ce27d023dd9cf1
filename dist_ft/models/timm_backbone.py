"""timm backbones: build any timm model by name, and read its structure from the model itself.

A timm model describes its own layout: ``group_matcher(coarse=False)`` assigns every
parameter to the stem, one of the body blocks, or (unmatched) the head, in the order timm's
own layer-wise lr decay (``timm.optim.param_groups_layer_decay``) uses; ``no_weight_decay()``
names the parameters it exempts from weight decay; ``pretrained_cfg`` gives the classifier's
module path, the input size and the normalisation of its pretrained weights. dist-ft's block
map is exactly timm's grouping, so ``last_blocks``, ``from_block`` and ``layer_decay`` mean
for a timm model what they mean in timm.

timm is imported lazily: torchvision-only runs do not pay for it.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import ModelConfig
from dist_ft.models.blocks import HEAD, STEM, BlockMap
from dist_ft.models.preprocessing import InputConfig
from dist_ft.models.weights import WeightsError, load_state_dict_file

log = logging.getLogger(__name__)

# A timm Hugging Face repo's default weight file (safetensors tried first, as timm does).
_HF_WEIGHTS = "pytorch_model.bin"


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model (it carries its ``pretrained_cfg`` and matcher)."""
    return hasattr(model, "pretrained_cfg") and callable(getattr(model, "group_matcher", None))


def check_timm_name(arch: str) -> None:
    """Check that timm knows ``arch`` (``NAME`` or ``NAME.TAG``).

    Raises:
        ConfigError: an unknown model or pretrained tag, naming ``model.name`` and the closest
            timm names.
    """
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    base, tag = split_model_name_tag(arch)
    if not timm.is_model(base):
        names = timm.list_models()
        close = difflib.get_close_matches(base, names, n=3)
        hint = f"did you mean {' or '.join('timm/' + c for c in close)}? " if close else ""
        raise ConfigError([f"model.name: unknown timm model {base!r}; {hint}(timm "
                           f"{timm.__version__} has {len(names)}: python -c \"import timm; "
                           "print(timm.list_models('*convnext*'))\")"])
    try:
        known = not tag or get_pretrained_cfg(arch) is not None
    except RuntimeError:  # timm's "Invalid pretrained tag"
        known = False
    if not known:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(base + ".*")]
        raise ConfigError([f"model.name: timm model {base!r} has no pretrained tag {tag!r}; "
                           f"its tags: {', '.join(tags) or 'none'}"])


def timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    """The pretrained config (input size, mean/std, classifier ...) of timm model ``arch``."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def cached_weights(arch: str) -> Path | None:
    """The local file of ``arch``'s default pretrained weights, or None when not cached.

    Looks where timm would download them, without touching the network: the Hugging Face
    hub cache (``HF_HOME``/``HF_HUB_CACHE``), then torch hub's ``checkpoints`` folder for
    weights published by URL.
    """
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import _get_safe_alternatives, hf_split

    cfg = timm_pretrained_cfg(arch)
    if cfg.get("hf_hub_id"):
        repo, revision = hf_split(cfg["hf_hub_id"])
        own = cfg.get("hf_hub_filename") or _HF_WEIGHTS
        for filename in (*_get_safe_alternatives(own), own):
            found = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name
        if path.is_file():
            return path
    return None


def _missing_weights(arch: str) -> WeightsError:
    from huggingface_hub import constants

    cfg = timm_pretrained_cfg(arch)
    where = cfg.get("hf_hub_id") or cfg.get("url") or "(no published weights)"
    return WeightsError(
        f"model.pretrained=imagenet: timm/{arch} weights ({where}) are not in the Hugging Face "
        f"cache at {constants.HF_HUB_CACHE}. dist-ft never downloads during a run. On a "
        f"machine with internet run\n"
        f"  python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"\n"
        f"and copy its models--* folder to {constants.HF_HUB_CACHE}/ (or set HF_HOME), or set "
        "model.pretrained to the PATH of the weights file."
    )


def _create(arch: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; models with a fixed input size (ViT, DeiT, Swin, EVA ...) are
    built to take any input size (``dynamic_img_size``, position embeddings resampled to the
    input) where they support it, so ``data.image_size`` may differ from the pretraining
    size without another interface."""
    import timm

    if timm_pretrained_cfg(arch).get("fixed_input_size"):
        try:
            return timm.create_model(arch, dynamic_img_size=True, **kwargs)
        except TypeError as exc:
            if "dynamic_img_size" not in str(exc):
                raise
            log.info("timm/%s takes only its pretrained input size", arch)
    return timm.create_model(arch, **kwargs)


def classifier_path(model: nn.Module) -> str:
    """Module path of a timm model's classifier (``head.fc``, ``classifier``, ``head``)."""
    path = model.pretrained_cfg.get("classifier") or "head"
    return path[0] if isinstance(path, (tuple, list)) else path


def build_timm_model(cfg: ModelConfig, *, meta: bool = False) -> nn.Module:
    """Build the timm model of ``cfg`` (``name: timm/NAME``) with its weights.

    Args:
        cfg: the ``model`` section; ``pretrained`` is ``none``, ``imagenet`` (timm's default
            pretrained weights for the name or ``NAME.TAG``, from the local cache only) or the
            PATH of a state dict (the classifier may be missing or of another size).
        meta: build on the meta device, without weights (for planning).

    Raises:
        ConfigError: timm does not know the name.
        WeightsError: the weights are not cached, or the file does not fit the model.
    """
    arch = cfg.arch
    check_timm_name(arch)
    if meta:
        with torch.device("meta"):
            return _create(arch, pretrained=False, num_classes=cfg.num_classes)
    if cfg.pretrained == "imagenet":
        path = cached_weights(arch)
        if path is None:
            raise _missing_weights(arch)
        # A 'file' overlay makes timm load the cached file with its own key fix-ups and
        # classifier handling (dropped when num_classes differs), and never go online.
        return _create(arch, pretrained=True, num_classes=cfg.num_classes,
                       pretrained_cfg_overlay={"file": str(path)})
    model = _create(arch, pretrained=False, num_classes=cfg.num_classes)
    if cfg.pretrained != "none":
        load_state_dict_file(model, cfg.pretrained, classifier_path(model))
    return model


# ------------------------------------------------------------------------ structure
def _base_names(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the name it has in the un-adapted model.

    peft puts the wrapped layer under ``X.base_layer`` and its adapters beside it
    (``X.lora_A.default.weight``); a saved module becomes ``X.original_module`` and
    ``X.modules_to_save.default``. Every parameter below such a wrapper at ``X`` is named
    ``X.<leaf>``: it belongs where ``X``'s own weight does.
    """
    wrapper_types: tuple[type, ...] = ()
    if "peft" in sys.modules:  # else no module can be a peft wrapper (and peft is slow to load)
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper

        wrapper_types = (BaseTunerLayer, ModulesToSaveWrapper)
    wrappers = [path + "." for path, m in model.named_modules()
                if path and isinstance(m, wrapper_types)]
    # A PeftModel (get_peft_model) holds the model under base_model.model.
    outer = "base_model.model." if callable(getattr(model, "get_base_model", None)) else ""
    out = {}
    for name, _ in model.named_parameters():
        # The outermost wrapper wins (a saved module may hold adapted layers).
        host = next((w for w in wrappers if name.startswith(w)), None)
        out[name] = (host + name.rsplit(".", 1)[-1] if host else name).removeprefix(outer)
    return out


@dataclass(frozen=True)
class _Entry:
    pattern: re.Pattern[str]
    attached: bool  # joins another group (timm's MATCH_PREV_GROUP or an explicit suffix)


def _entries(matcher: Any) -> list[_Entry]:
    """A dict group matcher's regexes in timm's order (the first match wins)."""
    if not isinstance(matcher, dict):
        return []
    out = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            out += [_Entry(re.compile(s[0]), s[1] is not None) for s in spec]
        else:
            out.append(_Entry(re.compile(spec), False))
    return out


def _common_prefix(paths: Iterable[str]) -> str:
    """The longest dotted module path every one of ``paths`` lies under ('' if none)."""
    parts = [p.split(".") for p in paths]
    if not parts:
        return ""
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def timm_block_map(model: nn.Module) -> BlockMap:
    """The block map of a timm model (or of one with peft adapters injected): timm's layer
    groups from ``group_matcher(coarse=False)``, in ``param_groups_layer_decay``'s order.

    Group 0 is ``stem``; the unmatched parameters (timm's last group, with the classifier)
    are ``head``; a body block is named by the module path its parameters share
    (``stages.1.blocks.0``, ``blocks.11``), attached parts such as a stage's downsampler or
    the final norm left out, else ``group{i}``.

    Raises:
        ValueError: the matcher puts the classifier into a body group.
    """
    from timm.models._manipulate import group_with_matcher

    matcher = model.group_matcher(coarse=False)
    base = _base_names(model)
    unique = list(dict.fromkeys(base.values()))
    layer_of: dict[str, int] = group_with_matcher(((n, None) for n in unique), matcher,
                                                  reverse=True)
    last = max(layer_of.values())
    head = classifier_path(model) + "."
    if not any(layer_of[n] == last for n in unique if n.startswith(head)):
        raise ValueError(f"{type(model).__name__}: its group_matcher assigns the classifier "
                         f"{head[:-1]} to a body group; no head block")
    entries = _entries(matcher)
    members: dict[int, list[str]] = {}
    for n in unique:
        members.setdefault(layer_of[n], []).append(n)
    names = {0: STEM, last: HEAD}
    for lid in range(1, last):
        group = members.get(lid, [])
        own = [n for n in group
               if not next((e.attached for e in entries if e.pattern.match(n)), False)]
        candidates = [_common_prefix(n.rpartition(".")[0] for n in own),
                      _common_prefix(n.rpartition(".")[0] for n in group)]
        name = next((c for c in candidates if c and c not in names.values()), f"group{lid}")
        names[lid] = name if name not in (STEM, HEAD) else f"group{lid}"
    blocks = tuple(names[i] for i in range(last + 1))
    return BlockMap(blocks=blocks, block_of={n: names[layer_of[b]] for n, b in base.items()})


def timm_no_decay(model: nn.Module) -> tuple[str, ...]:
    """Parameters the model exempts from weight decay: ``no_weight_decay()``'s names and
    patterns matched against every parameter name (``fnmatch``, as timm's optimizer factory
    does; an adapted parameter by its un-adapted name too)."""
    patterns = getattr(model, "no_weight_decay", lambda: set())()
    if not patterns:
        return ()
    base = _base_names(model)
    return tuple(n for n, b in base.items()
                 if any(fnmatch.fnmatch(n, p) or fnmatch.fnmatch(b, p) for p in patterns))


def enable_timm_checkpointing(model: nn.Module) -> list[str]:
    """Activation checkpointing through timm's ``set_grad_checkpointing()``; returns the
    module paths that now checkpoint their blocks (``<model>`` for the model itself).

    Raises:
        ValueError: the model does not support it.
    """
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as exc:
        raise ValueError(f"{type(model).__name__} does not support activation "
                         f"checkpointing (timm set_grad_checkpointing): {exc}") from None
    return [p or "<model>" for p, m in model.named_modules()
            if getattr(m, "grad_checkpointing", False) is True]


def timm_input_config(arch: str) -> InputConfig:
    """The model's own data config (timm's ``resolve_data_config`` of its pretrained cfg)."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=timm_pretrained_cfg(arch))
    mode = data.get("interpolation", "bicubic")
    return InputConfig(mean=tuple(data["mean"]), std=tuple(data["std"]),
                       interpolation=mode if mode in ("bilinear", "bicubic") else "bicubic",
                       pretrained_size=int(data["input_size"][-1]))
