"""A stable fingerprint of a resolved plan, and a diff that names what differs.

The records are plain JSON-able lists so that ranks can all-gather them and compare; the
digest is sha256 over their canonical JSON. Floats are written with ``float.hex`` so the
digest depends on exact values, never on formatting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dist_ft.plan.resolve import ResolvedStage

_FIELDS = ("shape", "trainable", "group", "lr", "weight_decay", "bn")


def plan_records(stages: Sequence[ResolvedStage]) -> list[dict[str, Any]]:
    """Per stage: its start, policy and adapters, and one row per parameter of the model as
    the stage trains it (sorted by name).

    A row is ``[name, shape, trainable, group, lr, weight_decay, bn]`` where ``bn`` is
    ``eval``/``train`` for parameters of BatchNorm layers with running statistics and ``-``
    otherwise; frozen parameters have group ``-`` and lr/weight decay ``-``.
    """
    records = []
    for stage in stages:
        spec = stage.spec
        bn_params = {p: n.name for n in spec.norms if n.tracks_stats for p in n.params}
        where = {p: g for g in stage.groups for p in g.params}
        eval_set = set(stage.bn_eval)
        rows = []
        for p in sorted(spec.params, key=lambda q: q.name):
            group = where.get(p.name)
            module = bn_params.get(p.name)
            bn = "-" if module is None else ("eval" if module in eval_set else "train")
            rows.append([
                p.name,
                list(p.shape),
                group is not None,
                group.name if group else "-",
                group.lr.hex() if group else "-",
                group.weight_decay.hex() if group else "-",
                bn,
            ])
        record = {"stage": stage.name, "start": stage.start, "bn_policy": stage.bn_policy,
                  "params": rows}
        if stage.adapters is not None:  # absent otherwise: digests of older plans stay valid
            record["adapters"] = stage.adapters.record()
        records.append(record)
    return records


def records_digest(records: list[dict[str, Any]]) -> str:
    """``sha256:<hex>`` of the canonical JSON of :func:`plan_records`."""
    blob = json.dumps(records, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def diff_records(
    a: list[dict[str, Any]], b: list[dict[str, Any]], limit: int = 5
) -> list[str]:
    """Name the first differences between two plans' records (empty list when equal).

    >>> diff_records(plan_records(p.stages), plan_records(q.stages))
    ["stage 1 'last_blocks': features.norm5.weight: trainable True != False", ...]
    """
    out: list[str] = []
    if len(a) != len(b):
        out.append(f"number of stages: {len(a)} != {len(b)}")
    for i, (sa, sb) in enumerate(zip(a, b, strict=False)):
        label = f"stage {i} '{sa['stage']}'"
        for key in ("stage", "start", "bn_policy", "adapters"):
            if sa.get(key) != sb.get(key):
                out.append(f"{label}: {key} {sa.get(key)!r} != {sb.get(key)!r}")
        rows_b = {r[0]: r for r in sb["params"]}
        names_a = {r[0] for r in sa["params"]}
        for row in sa["params"]:
            other = rows_b.get(row[0])
            if other is None:
                out.append(f"{label}: {row[0]}: only in the first plan")
            else:
                for field, va, vb in zip(_FIELDS, row[1:], other[1:], strict=True):
                    if va != vb:
                        out.append(f"{label}: {row[0]}: {field} {va!r} != {vb!r}")
                        break
            if len(out) >= limit:
                return out[:limit]
        out.extend(
            f"{label}: {name}: only in the second plan"
            for name in sorted(set(rows_b) - names_a)
        )
        if len(out) >= limit:
            return out[:limit]
    return out[:limit]
