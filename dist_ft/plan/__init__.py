"""Freeze plans and parameter groups, resolved on parameter names and shapes (no torch)."""

from dist_ft.models.structure import ModelSpec, NormModule, ParamInfo
from dist_ft.plan.digest import diff_records, plan_records, records_digest
from dist_ft.plan.groups import ResolvedGroup
from dist_ft.plan.resolve import ResolvedPlan, ResolvedStage, resolve_plan

__all__ = [
    "ModelSpec",
    "NormModule",
    "ParamInfo",
    "ResolvedGroup",
    "ResolvedPlan",
    "ResolvedStage",
    "diff_records",
    "plan_records",
    "records_digest",
    "resolve_plan",
]
