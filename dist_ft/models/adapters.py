"""Adapters on a model through peft: inject, merge, describe, and save in peft's own format.

A plan's adapter stage (:class:`dist_ft.plan.adapters.ResolvedAdapters`) becomes peft layers
injected in place (``peft.inject_adapter_in_model``), so parameter names stay the model's own
apart from ``X.base_layer.*`` and the adapter tensors under a wrapped layer ``X``. Leaving the
stage merges them into the base weights (peft's ``merge``) and puts the plain layers back.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dist_ft.config.schema import ModelConfig
from dist_ft.models.factory import build_model
from dist_ft.models.spec import describe_model
from dist_ft.models.structure import ModelSpec, ResolvedAdapters

if TYPE_CHECKING:
    from peft import PeftConfig

ADAPTER_CONFIG = "adapter_config.json"  # peft's file names: PeftModel.from_pretrained reads them
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Where peft keeps adapter tensors under a wrapped layer (LoRA/DoRA and IA3).
_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".ia3_l.")


def peft_config(adapters: ResolvedAdapters, modules_to_save: list[str] | None = None,
                base_model: str | None = None) -> PeftConfig:
    """The peft config of ``adapters`` (targets as one exact-path regex: no suffix matches)."""
    from peft import IA3Config, LoraConfig

    target = "^(?:" + "|".join(re.escape(m) for m in adapters.modules) + ")$"
    if adapters.kind == "ia3":
        return IA3Config(target_modules=target, feedforward_modules=[],
                         modules_to_save=modules_to_save, base_model_name_or_path=base_model)
    return LoraConfig(r=adapters.r, lora_alpha=adapters.alpha, lora_dropout=adapters.dropout,
                      target_modules=target, use_dora=adapters.kind == "dora",
                      modules_to_save=modules_to_save, base_model_name_or_path=base_model)


def inject(module: nn.Module, adapters: ResolvedAdapters, meta: bool = False) -> nn.Module:
    """Wrap the targeted layers of ``module`` in place (``meta``: adapter tensors on meta)."""
    from peft import inject_adapter_in_model

    module = inject_adapter_in_model(peft_config(adapters), module, low_cpu_mem_usage=meta)
    # Not a PeftModel: drop the attribute peft leaves, so nothing mistakes the module for one.
    module.__dict__.pop("peft_config", None)
    return module


def merge(module: nn.Module) -> nn.Module:
    """Merge every adapter into its base weights and put the plain layers back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        with torch.no_grad():
            layer.merge(safe_merge=True)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr,
                layer.get_base_layer())
    return module


def adapt(module: nn.Module, current: ResolvedAdapters | None,
          target: ResolvedAdapters | None, seed: int | None = None) -> nn.Module:
    """Change ``module`` from carrying ``current`` adapters to ``target`` (equal: as is).

    With ``seed``, the new adapters' initial values come from that seed alone (not from
    whatever drew from the global generator before), so every backend, world size and resume
    path starts a stage's adapters alike; the global generator is left as it was.
    """
    if current == target:
        return module
    if current is not None:
        module = merge(module)
    if target is not None:
        if seed is None:
            return inject(module, target)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            module = inject(module, target)
    return module


@cache
def _adapted_spec(cfg_json: str, adapters: ResolvedAdapters) -> ModelSpec:
    cfg = ModelConfig.model_validate_json(cfg_json)
    module = inject(build_model(cfg, meta=True), adapters, meta=True)
    return describe_model(module, cfg.name)


def adapted_spec(cfg: ModelConfig, adapters: ResolvedAdapters) -> ModelSpec:
    """The :class:`ModelSpec` of the model with ``adapters`` injected (a meta-device build)."""
    return _adapted_spec(cfg.model_dump_json(), adapters)


def _plain_module(cfg: ModelConfig, state: dict[str, torch.Tensor],
                  adapters: ResolvedAdapters | None) -> nn.Module:
    """A module of the given structure holding ``state`` (tensors assigned, not copied)."""
    module = build_model(cfg.model_copy(update={"pretrained": "none"}), meta=True)
    if adapters is not None:
        module = inject(module, adapters, meta=True)
    wanted = module.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} tensors of the model: {missing[:3]}")
    module.load_state_dict({k: state[k] for k in wanted}, assign=True)
    return module


def merged_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor],
                      adapters: ResolvedAdapters) -> dict[str, torch.Tensor]:
    """The plain model's weights (the model's own names) of an adapted model's ``state``."""
    targets = {f"{m}.base_layer.weight" for m in adapters.modules}
    # merge() writes into the base weights: give it copies, never the caller's tensors.
    own = {k: (v.clone() if k in targets else v) for k, v in state.items()}
    module = merge(_plain_module(cfg, own, adapters))
    return {k: v.detach() for k, v in module.state_dict().items()}


def save_peft_adapter(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                      adapters: ResolvedAdapters, trained_modules: list[str]) -> int:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` as peft does.

    ``PeftModel.from_pretrained(model, folder)`` on the model built from the recipe's
    ``model`` section then computes what the adapted model computed: the adapter tensors,
    plus the full weights of ``trained_modules`` (layers trained beside the adapters, such as
    the head) as peft's ``modules_to_save``.

    Returns:
        The adapter file's size in bytes.
    """
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = peft_config(adapters, trained_modules or None, base_model=cfg.name)
    plain = _plain_module(cfg, {k.replace(".base_layer.", "."): v for k, v in state.items()
                                if not is_adapter_param(k)}, None)
    with torch.random.fork_rng(devices=[]):  # no draw from the run's generator
        peft_model = get_peft_model(plain, config, low_cpu_mem_usage=True)
    config.base_model_name_or_path = cfg.name  # get_peft_model resets it
    # PeftModel's names: base_model.model.<ours>, with modules_to_save copies beside.
    names = {}
    for key in peft_model.state_dict():
        ours = key.removeprefix("base_model.model.")
        ours = ours.replace("modules_to_save.default.", "").replace("original_module.", "")
        names[key] = ours
    full = {k: state[v] for k, v in names.items() if v in state}
    tensors = get_peft_model_state_dict(peft_model, state_dict=full)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / ADAPTER_WEIGHTS
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    tmp.replace(weights)
    doc = config.to_dict()
    text = json.dumps({k: (sorted(v) if isinstance(v, set) else v) for k, v in doc.items()},
                      indent=2, default=str)
    tmp_config = folder / (ADAPTER_CONFIG + ".tmp")
    tmp_config.write_text(text, encoding="utf-8")
    tmp_config.replace(folder / ADAPTER_CONFIG)
    return weights.stat().st_size


def remove_peft_adapter(folder: Path) -> None:
    """Delete adapter files left in ``folder`` by an earlier write (the weights changed)."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (folder / name).unlink(missing_ok=True)


def is_adapter_param(name: str) -> bool:
    """Whether ``name`` is an adapter's tensor (not a weight of the model itself)."""
    return any(m in name for m in _ADAPTER_MARKERS)


def peft_modules_to_save(trainable: tuple[str, ...], adapters: ResolvedAdapters
                         ) -> tuple[list[str], str]:
    """The modules whose own weights train beside the adapters (peft's ``modules_to_save``),
    or why peft's format cannot hold this stage (an empty list and the reason).

    peft saves whole modules that hold no adapted layer: a tensor of the model itself
    (ViT's class token) or of a module around an adapted layer (ConvNeXt's block scale) has no
    place in its format.
    """
    out: dict[str, None] = {}
    for name in trainable:
        if is_adapter_param(name) or ".base_layer." in name:
            continue
        module = name.rpartition(".")[0]
        if not module or any(m == module or m.startswith(module + ".")
                             for m in adapters.modules):
            return [], (f"{name} trains beside the adapters but is not a parameter of a whole "
                        "module peft can save (modules_to_save)")
        out.setdefault(module, None)
    return list(out), ""


def state_digest(state: dict[str, Any]) -> str:
    """``sha256:<hex>`` over the tensors of ``state`` (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()
