"""dist_ft.evaluation stays light: numpy at import time, matplotlib and torch only lazily."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dist_ft" / "evaluation"
HEAVY = {"torch", "torchmetrics", "matplotlib", "accelerate", "deepspeed"}


def test_no_heavy_import_at_module_level() -> None:
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only, not in functions
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in HEAVY]
            found += [f"{path.name}:{node.lineno} {n}" for n in names
                      if n.startswith("dist_ft.") and n.split(".")[1] not in
                      {"evaluation", "jsonio", "plotstyle"}]  # plotstyle: matplotlib lazily
    assert not found, found
