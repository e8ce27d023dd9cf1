"""JSON that strict readers (jq, browsers, other languages) accept: NaN and infinities, which
Python's json writes as bare ``NaN``/``Infinity``, become ``null``. Undefined metrics (AUROC of
a class without positives) are NaN, so every JSON document dist-ft writes goes through here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None (recursively; numpy scalars too)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):  # numpy / torch scalars
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``; refuses any NaN left (``allow_nan=False``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **{"indent": 2, "default": str, **kwargs})


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a one-object-a-line file, in order: a line cut by a crash (or
    otherwise unreadable, or not an object) is skipped, the others still count; an empty
    list when the file is missing."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out
