"""The commands that need no model answer without importing torch (start-up in tenths of a
second, not seconds): each runs as a user runs it, under ``python -X importtime``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REAL_CXR14, REPO


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["plan", str(CONFIGS / "chestxray14_densenet121.yaml"), "--json"],
    ["data", "stats", str(REAL_CXR14), "--json"],
    ["submit", str(CONFIGS / "chestxray14_smoke.yaml"), "--dry-run", "--nodes", "2"],
    ["jobs", "--help"],
    ["aggregate", "--help"],
    ["eval", "--help"],
], ids=lambda argv: " ".join(a if "/" not in a else Path(a).name for a in argv))
def test_commands_without_a_model_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "dist_ft", *argv],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "dist_ft.cli.main" in imported  # the probe sees the command's imports
    assert "torch" not in imported, [m for m in imported if m.startswith("dist_ft")]
