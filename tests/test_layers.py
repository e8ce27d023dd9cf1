"""The package's layers hold: light modules load no torch, and no import points upward.

Layers, highest first: cli > bench, launch > train, explain > data, plan > models,
evaluation > config (``evaluation`` is the statistics of scored predictions, ``explain`` the
heatmaps and their localization scores). A module
imports its own package and lower layers only (so data and plan, peers, never import each
other, nor do bench and launch). ``jsonio``, ``exitcodes``, ``rundir`` and ``cluster`` are base
modules any layer may import (they import only each other; ``runlock``, the run folder's
lock, is one too); ``logs`` imports only base modules
and is imported only by launch, bench, cli and train.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dist_ft"

RANK = {"config": 0, "evaluation": 1, "models": 1, "data": 2, "plan": 2, "train": 3,
        "explain": 3, "bench": 4, "launch": 4, "cli": 5}
BASE = {"jsonio", "exitcodes", "rundir", "cluster",
        "runlock",  # the run folder's lock: pure, beside rundir
        "console",  # log levels and progress on stderr: no torch
        "plotstyle"}  # line colours and dashes shared by the ROC and aggregate plots
LOGS = "logs"
LOGS_USERS = {"launch", "bench", "cli", "train"}

# Must import without loading torch (each in its own interpreter, so a culprit is named);
# ``module:function`` also calls the function.
TORCH_FREE = ("dist_ft.config", "dist_ft.plan", "dist_ft.logs", "dist_ft.rundir",
              "dist_ft.evaluation.report", "dist_ft.console",
              # every command builds the whole parser: its defaults must not load torch
              "dist_ft.cli.main", "dist_ft.cli.main:build_parser")

# Edges a pending change removes: (file, imported module). Empty this when it lands; the
# second test below fails once an entry no longer occurs, so the list only shrinks.
PENDING: set[tuple[str, str]] = set()

_PROBE = r"""
import importlib, sys, traceback

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            chain = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                     if "/dist_ft/" in f.filename and "<frozen" not in f.filename]
            print("torch imported via " + (" -> ".join(chain) or "?"), file=sys.stderr)
        return None

sys.meta_path.insert(0, Probe())
name, _, call = sys.argv[1].partition(":")
module = importlib.import_module(name)
if call:
    getattr(module, call)()
sys.exit(3 if "torch" in sys.modules else 0)
"""


@dataclass(frozen=True)
class Edge:
    """One ``dist_ft`` import: where it is, what it names, and the two layers."""

    path: str
    line: int
    target: str
    src: str
    dst: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target} ({self.src} -> {self.dst})"


def layer_of(module: str) -> str:
    """Layer of a dotted ``dist_ft`` module name (``base`` for the base modules)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE or parts[1] == "__init__":
        return "base"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _targets(node: ast.AST, path: Path) -> list[str]:
    """The ``dist_ft`` modules one import statement names (``from dist_ft import x`` -> x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "dist_ft"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against the file's own package
        package = _module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        base = ".".join([*package[:len(package) - node.level + 1], *filter(None, [base])])
    if base.split(".")[0] != "dist_ft":
        return []
    if base == "dist_ft":  # a submodule, or a name of the package itself (__version__)
        return [f"dist_ft.{a.name}" if (PACKAGE / a.name).is_dir()
                or (PACKAGE / f"{a.name}.py").exists() else "dist_ft" for a in node.names]
    return [base]


def _allowed(src: str, dst: str) -> bool:
    if src == dst or dst == "base":
        return True
    if src == "base":
        return False
    if src == LOGS:
        return False
    if dst == LOGS:
        return src in LOGS_USERS
    if src not in RANK or dst not in RANK:  # test_every_layer_known names these
        return False
    return RANK[dst] < RANK[src]


def import_edges() -> list[Edge]:
    """Every ``dist_ft`` import under ``dist_ft/`` (top level and inside functions)."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        src = layer_of(_module_name(path))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            for target in _targets(node, path):
                edges.append(Edge(rel, node.lineno, target, src, layer_of(target)))
    return edges


def test_light_modules_do_not_load_torch() -> None:
    procs = {m: subprocess.Popen([sys.executable, "-c", _PROBE, m], cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for m in TORCH_FREE}
    problems = []
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 3:
            via = [line for line in err.splitlines() if line.startswith("torch imported via")]
            problems.append(f"import {module} loads torch; {via[0] if via else err.strip()}")
        elif proc.returncode:
            problems.append(f"import {module} failed (exit {proc.returncode}):\n{out}{err}")
    assert not problems, ("keep torch imports inside the functions that need them:\n"
                          + "\n".join(problems))


def test_every_layer_known() -> None:
    known = {*RANK, *BASE, LOGS}
    found = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists())
             or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))}
    assert found <= known, f"give these a layer in tests/test_layers.py: {sorted(found - known)}"


def test_no_import_points_upward() -> None:
    wrong = [e for e in import_edges() if not _allowed(e.src, e.dst)
             and (e.path, e.target) not in PENDING]
    assert not wrong, ("imports against the layers (cli > bench, launch > train > data, plan > "
                       "models > config; logs only from launch, bench, cli, train):\n"
                       + "\n".join(map(str, wrong)))


def test_pending_exemptions_still_needed() -> None:
    present = {(e.path, e.target) for e in import_edges() if not _allowed(e.src, e.dst)}
    stale = sorted(PENDING - present)
    assert not stale, f"remove from PENDING in tests/test_layers.py, now fixed: {stale}"
