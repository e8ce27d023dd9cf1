"""Match freeze-plan and group rules against a model's parameters."""

from __future__ import annotations

import difflib
import re
from fnmatch import fnmatchcase

from dist_ft.config.schema import Rule
from dist_ft.models.blocks import HEAD, STEM
from dist_ft.models.structure import ModelSpec


class RuleError(ValueError):
    """A rule cannot be resolved against the model (unknown block, matches nothing...)."""


def _module_prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def known_prefixes(spec: ModelSpec, limit: int = 24) -> list[str]:
    """Short module paths of the model (two levels deep), for error messages."""
    seen: dict[str, None] = {}
    for p in spec.params:
        module = p.name.rpartition(".")[0] or p.name
        seen.setdefault(".".join(module.split(".")[:2]), None)
    prefixes = list(seen)
    return prefixes if len(prefixes) <= limit else [*prefixes[:limit], "..."]


def _check_block(block: str, spec: ModelSpec) -> None:
    if block not in spec.blocks.blocks:
        close = difflib.get_close_matches(block, spec.blocks.blocks, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RuleError(
            f"{spec.name} has no block {block!r}; {hint}blocks: {', '.join(spec.blocks.blocks)}"
        )


def match_rule(rule: Rule, spec: ModelSpec) -> list[str]:
    """Names of the parameters ``rule`` selects, in model order.

    Raises:
        RuleError: the rule names an unknown block, asks for more blocks than the model has,
            or matches no parameter at all (typo protection).
    """
    block_of = spec.blocks.block_of
    names = [p.name for p in spec.params]
    if rule.keyword == "all":
        hits = names
    elif rule.keyword is not None:
        target = HEAD if rule.keyword == "head" else STEM
        hits = [n for n in names if block_of[n] == target]
    elif rule.glob is not None:
        pattern = rule.glob
        hits = [
            n for n in names
            if fnmatchcase(n, pattern) or any(fnmatchcase(m, pattern) for m in _module_prefixes(n))
        ]
    elif rule.regex is not None:
        rx = re.compile(rule.regex)
        hits = [n for n in names if rx.search(n)]
    elif rule.blocks is not None:
        for b in rule.blocks:
            _check_block(b, spec)
        wanted = set(rule.blocks)
        hits = [n for n in names if block_of[n] in wanted]
    elif rule.last_blocks is not None:
        body = spec.blocks.body
        if rule.last_blocks > len(body):
            raise RuleError(
                f"last_blocks: {rule.last_blocks} but {spec.name} has {len(body)} body blocks "
                f"({', '.join(body)})"
            )
        wanted = set(body[-rule.last_blocks:])
        hits = [n for n in names if block_of[n] in wanted]
    else:
        assert rule.from_block is not None  # guaranteed by Rule's validator
        _check_block(rule.from_block, spec)
        start = spec.blocks.index(rule.from_block)
        hits = [n for n in names if spec.blocks.index(block_of[n]) >= start]
    if not hits:
        prefixes = known_prefixes(spec)
        close = difflib.get_close_matches(rule.describe().rstrip(".*"), prefixes, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RuleError(
            f"{rule.describe()!r} matched no parameter of {spec.name}; {hint}"
            f"known prefixes: {', '.join(prefixes)}; blocks: {', '.join(spec.blocks.blocks)}"
        )
    return hits
