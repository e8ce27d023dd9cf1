"""Parameter groups for one stage: rule groups, layer-wise lr decay, no decay on 1-D params.

Precedence, for each trainable parameter:
  1. its group is the first ``optim.groups`` entry whose rules match it, else ``default``;
  2. its base lr is that group's ``lr`` (absolute) or ``optim.lr * lr_scale``;
  3. with ``optim.layer_decay = d``, the lr is multiplied by ``d ** (depth - k)`` where ``k``
     is the parameter's block index (``stem`` = 0, ``head`` = depth), and the group is split
     per block;
  4. the stage's ``lr_scale`` multiplies every lr;
  5. with ``optim.no_decay_1d`` (default), parameters with ``ndim <= 1`` (biases, norm scales)
     and those the model exempts itself (timm's ``no_weight_decay()``: position embeddings,
     class tokens) get weight decay 0 in a ``.no_decay`` twin of their group; else the
     group's decay.
Groups left without trainable parameters are pruned; groups whose lr and weight decay are
identical are merged (names joined with ``+``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_ft.config.schema import OptimConfig
from dist_ft.models.structure import ModelSpec


@dataclass(frozen=True)
class ResolvedGroup:
    """One optimizer parameter group.

    Attributes:
        name: stable, human-readable name (``default.no_decay``, ``backbone.layer3``...).
        params: parameter names, in model order.
        lr: the group's learning rate before any schedule.
        lr_scale: ``lr / optim.lr``, what schedulers multiply (timm convention).
        weight_decay: the group's weight decay.
        num_params: number of parameter elements.
    """

    name: str
    params: tuple[str, ...]
    lr: float
    lr_scale: float
    weight_decay: float
    num_params: int


def resolve_groups(
    spec: ModelSpec,
    optim: OptimConfig,
    trainable: list[str],
    group_members: dict[str, set[str]],
    stage_lr_scale: float,
) -> tuple[list[ResolvedGroup], list[str]]:
    """Split a stage's trainable parameters into optimizer groups.

    Args:
        spec: the model description.
        optim: the ``optim`` section.
        trainable: trainable parameter names, in model order.
        group_members: for each ``optim.groups`` entry (by name), the parameters its rules match.
        stage_lr_scale: the stage's lr multiplier.

    Returns:
        The groups (in order of their first parameter) and the names of configured groups that
        have no trainable parameter in this stage (pruned).
    """
    info = {p.name: p for p in spec.params}
    exempt = set(spec.no_decay)
    blocks = spec.blocks
    buckets: dict[str, tuple[float, float, list[str]]] = {}
    used: set[str] = set()
    for name in trainable:
        rule = next((g for g in optim.groups if name in group_members[g.name]), None)
        base = rule.name if rule else "default"
        lr = (rule.lr if rule and rule.lr is not None else optim.lr) * (
            rule.lr_scale if rule and rule.lr_scale is not None else 1.0
        )
        decay = rule.weight_decay if rule and rule.weight_decay is not None else optim.weight_decay
        key = base
        if optim.layer_decay is not None:
            block = blocks.block_of[name]
            lr *= optim.layer_decay ** (blocks.depth - blocks.index(block))
            key = f"{base}.{block}"
        lr *= stage_lr_scale
        if optim.no_decay_1d and (info[name].ndim <= 1 or name in exempt):
            decay, key = 0.0, f"{key}.no_decay"
        used.add(base)
        bucket = buckets.setdefault(key, (lr, decay, []))
        bucket[2].append(name)
    merged: dict[tuple[float, float], tuple[list[str], list[str]]] = {}
    for key, (lr, decay, names) in buckets.items():
        keys, members = merged.setdefault((lr, decay), ([], []))
        keys.append(key)
        members.extend(names)
    order = {n: i for i, n in enumerate(trainable)}
    groups = [
        ResolvedGroup(
            name="+".join(keys),
            params=tuple(sorted(members, key=order.__getitem__)),
            lr=lr,
            lr_scale=lr / optim.lr,
            weight_decay=decay,
            num_params=sum(info[n].numel for n in members),
        )
        for (lr, decay), (keys, members) in merged.items()
    ]
    groups.sort(key=lambda g: order[g.params[0]])
    pruned = [g.name for g in optim.groups if g.name not in used]
    return groups, pruned
