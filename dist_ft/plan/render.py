"""The one rendering of a resolved plan: the JSON document and the plain-text summary.

``dist-ft plan --json``, the run folder's ``plan.json`` and the trainer's TensorBoard text all
come from here, so they cannot drift apart. Pure Python: no torch, no rich.
"""

from __future__ import annotations

from typing import Any

from dist_ft.models.structure import ParamInfo
from dist_ft.plan.resolve import ResolvedPlan, ResolvedStage


def plan_to_json(plan: ResolvedPlan, with_params: bool = False) -> dict[str, Any]:
    """Return the plan as one JSON-ready document (a superset of the documented shape).

    Args:
        plan: the resolved plan.
        with_params: also list every parameter with its shape, block and group per stage.

    Returns:
        ``{"digest", "model", "num_params", "blocks", "stages": [...]}`` (plus ``"params"``
        when ``with_params``).
    """
    spec = plan.spec
    doc: dict[str, Any] = {
        "digest": plan.digest,
        "model": plan.model,
        "num_params": spec.num_params,
        "blocks": list(spec.blocks.blocks),
        "stages": [],
    }
    for s in plan.stages:
        groups = []
        for g in s.groups:
            entry: dict[str, Any] = {
                "name": g.name,
                "lr": g.lr,
                "lr_scale": g.lr_scale,
                "weight_decay": g.weight_decay,
                "num_params": g.num_params,
                "num_tensors": len(g.params),
            }
            if with_params:
                entry["params"] = list(g.params)
            groups.append(entry)
        doc["stages"].append({
            "name": s.name,
            "index": s.index,
            "start": s.start,
            "bn_policy": s.bn_policy,
            "lr_scale": s.lr_scale,
            "trainable_params": s.trainable_params,
            "frozen_params": s.frozen_params,
            "trainable_tensors": len(s.trainable),
            "frozen_bn_modules": list(s.bn_eval),
            "pruned_groups": list(s.pruned_groups),
            "groups": groups,
            "adapters": None if s.adapters is None else {
                "kind": s.adapters.kind, "r": s.adapters.r, "alpha": s.adapters.alpha,
                "dropout": s.adapters.dropout, "modules": list(s.adapters.modules),
                "adapter_params": s.adapter_params,
                "frozen_base_params": s.frozen_params,
            },
        })
    if with_params:
        where = [{p: g.name for g in s.groups for p in g.params} for s in plan.stages]
        doc["params"] = [
            {
                "name": p.name,
                "shape": list(p.shape),
                "block": block,
                "stages": [w.get(p.name) for w in where],
            }
            for p, block in all_params(plan)
        ]
    return doc


def all_params(plan: ResolvedPlan) -> list[tuple[ParamInfo, str]]:
    """Every parameter any stage has (the model's, then adapter stages' new names), with its
    block, in model order."""
    seen: dict[str, tuple[ParamInfo, str]] = {}
    for spec in (plan.spec, *(s.spec for s in plan.stages)):
        for p in spec.params:
            seen.setdefault(p.name, (p, spec.blocks.block_of[p.name]))
    return list(seen.values())


def adapter_summary(stage: ResolvedStage) -> str:
    """A stage's adapters in one line: kind, size, wrapped layers, what they train."""
    a = stage.adapters
    if a is None:
        return "none"
    rank = "" if a.kind == "ia3" else f" r={a.r} alpha={a.alpha:g}"
    shown = ", ".join(a.modules[:3]) + (f", ... ({len(a.modules)} layers)"
                                         if len(a.modules) > 3 else "")
    return (f"{a.kind}{rank} on {shown}: {stage.adapter_params:,} adapter params train, "
            f"{stage.frozen_params:,} base params frozen")


def plan_to_text(plan: ResolvedPlan) -> str:
    """Return the plan as plain text: the digest, then each stage and its groups.

    This is the trainer's TensorBoard ``plan`` text. For a resnet18 head-then-top recipe:

    >>> print(plan_to_text(plan))  # doctest: +SKIP
    digest sha256:708945ed...
    stage 0 head from epoch 0: 1,026 trainable, 20 BN frozen
      fc: 1,024 params, lr 0.001, wd 0.0001
      fc.no_decay: 2 params, lr 0.001, wd 0
    stage 1 top from epoch 3: 10,494,466 trainable, 10 BN frozen
      layer3: 2,097,152 params, lr 0.0001, wd 0.0001
      ...
    """
    lines = [f"digest {plan.digest}"]
    for s in plan.stages:
        start = ", ".join(f"{k} {v}" for k, v in s.start.items())
        lines.append(f"stage {s.index} {s.name} from {start}: {s.trainable_params:,} "
                     f"trainable, {len(s.bn_eval)} BN frozen")
        if s.adapters is not None:
            lines.append(f"  adapters: {adapter_summary(s)}")
        lines += [f"  {g.name}: {g.num_params:,} params, lr {g.lr:.3g}, wd {g.weight_decay:g}"
                  for g in s.groups]
    return "\n".join(lines)
