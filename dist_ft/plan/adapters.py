"""Adapter stages of a plan: which layers a stage's adapters wrap, and how names change.

peft wraps a targeted layer ``X`` in place: its own weights move to ``X.base_layer.*`` (and
stay frozen) and the adapter's tensors appear beside them (``X.lora_A.default.weight``...).
This module resolves a stage's ``adapters.target`` rules to layer paths and maps base
parameter names to their names in the adapted model. Pure: names only; the adapted model's
parameter shapes come from :func:`dist_ft.models.adapters.adapted_spec`.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase

from dist_ft.config.schema import AdapterConfig, Rule
from dist_ft.models.structure import BASE_LAYER, ModelSpec, ResolvedAdapters
from dist_ft.plan.rules import RuleError, match_rule

# The layer kinds peft adapts for every kind dist-ft offers (LoRA, DoRA, IA3).
ADAPTABLE = ("Linear", "Conv2d")

__all__ = ["ADAPTABLE", "BASE_LAYER", "ResolvedAdapters", "resolve_adapters"]


def _component_match(layer: str, pattern: str) -> bool:
    """``pattern`` matches a whole run of ``layer``'s dotted components (``attn``,
    ``mlp.fc1``, ``denseblock4.*.conv2``), or the whole path."""
    return any(fnmatchcase(layer, p) for p in
               (pattern, f"*.{pattern}", f"{pattern}.*", f"*.{pattern}.*"))


def _layers_of(rule: Rule, spec: ModelSpec) -> set[str]:
    """Layer paths (any kind) ``rule`` selects: a glob by path components, anything else by
    the layer's weight being among the rule's parameters."""
    layers = [la.name for la in spec.layers]
    if rule.glob is not None:
        hits = {la for la in layers if _component_match(la, rule.glob)}
        if not hits:
            parts = sorted({c for la in layers for c in la.split(".") if not c.isdigit()})
            close = difflib.get_close_matches(rule.glob, parts, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RuleError(f"{rule.glob!r} matched no layer of {spec.name}; {hint}layer "
                            f"names: {', '.join(parts[:30])}")
        return hits
    params = set(match_rule(rule, spec))
    return {la for la in layers if f"{la}.weight" in params or f"{la}.in_proj_weight" in params}


def resolve_adapters(cfg: AdapterConfig, spec: ModelSpec) -> ResolvedAdapters:
    """The layers ``cfg.target`` selects (every rule narrows), in model order.

    Raises:
        RuleError: a rule selects nothing, the rules together select nothing, or they select
            only layers peft cannot adapt (named, with their kinds).
    """
    selected: set[str] | None = None
    for rule in cfg.target:
        hits = _layers_of(rule, spec)
        if not hits:
            raise RuleError(f"{rule.describe()!r} selects no weight layer of {spec.name} "
                            "(only its parameters' own layers can be adapted)")
        selected = hits if selected is None else selected & hits
    kinds = {la.name: la.kind for la in spec.layers}
    chosen = [la.name for la in spec.layers if la.name in (selected or set())]
    # torch's MultiheadAttention reads its out_proj's weight directly, past any wrapper: an
    # adapter there would never train. Those layers are left out.
    attention = [la.name + "." for la in spec.layers if la.kind == "MultiheadAttention"]
    bypassed = [n for n in chosen if any(n.startswith(a) for a in attention)]
    modules = tuple(n for n in chosen if kinds[n] in ADAPTABLE and n not in bypassed)
    if not modules:
        described = ", ".join(r.describe() for r in cfg.target)
        if bypassed:
            raise RuleError(f"target [{described}] selects only {', '.join(bypassed[:2])}"
                            f"{'...' if len(bypassed) > 2 else ''}: Linear layers inside "
                            "torch's MultiheadAttention, which uses their weights directly, "
                            "so an adapter there would never train (timm ViTs have "
                            "attn.qkv and attn.proj Linear layers)")
        if chosen:
            found = ", ".join(f"{n} ({kinds[n]})" for n in chosen[:4])
            raise RuleError(f"target [{described}] selects no {' or '.join(ADAPTABLE)} layer "
                            f"of {spec.name}, only {found}: {cfg.kind} adapts "
                            f"{' and '.join(ADAPTABLE)} layers")
        raise RuleError(f"target [{described}] together select no layer of {spec.name} "
                        "(each rule narrows the previous ones)")
    return ResolvedAdapters(cfg.kind, cfg.r, cfg.alpha, cfg.dropout, modules)
