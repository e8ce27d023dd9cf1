"""``dist-ft bench cli`` with one timed run: the figures' shape and the torch probe's verdicts
(never the timings themselves: the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.bench import cli_speed
from dist_ft.bench.cli_speed import bench_cli, format_table, parse_importtime

IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:       300 |        400 | io
import time:      2000 |       2000 |     torch._C
import time:      5000 |       7000 |   torch
import time:        50 |       7050 | dist_ft.cli.eval
some other stderr line
"""


def test_parse_importtime_finds_nested_torch_and_attributes_self_time() -> None:
    doc = parse_importtime(IMPORTTIME)
    assert doc["imports_torch"] is True and doc["modules"] == 5
    assert doc["import_s"] == {"torch": 0.007, "(stdlib)": 0.0004, "dist_ft": 0.00005}
    assert list(doc["import_s"]) == ["torch", "(stdlib)", "dist_ft"]  # heaviest first
    without = parse_importtime(IMPORTTIME.replace("torch", "torchvisionless_thing"))
    assert without["imports_torch"] is False


def test_bench_cli_reports_each_command_and_whether_it_imported_torch(
        run_cli, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    result = run_cli("bench", "cli", "--commands", "python", "import-torch", "plan",
                     "--repeats", "1", "--json", "--out", str(out))
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc == json.loads(out.read_text())
    assert doc["repeats"] == 1 and list(doc["commands"]) == ["python", "import-torch", "plan"]
    for row in doc["commands"].values():
        s = row["seconds"]
        assert len(s["runs"]) == 1 and s["min"] <= s["median"] <= s["max"]
        assert s["median"] > 0 and row["modules"] > 0
    rows = doc["commands"]
    assert rows["plan"]["imports_torch"] is False
    assert rows["import-torch"]["imports_torch"] is True
    assert rows["python"]["imports_torch"] is False
    assert rows["plan"]["command"] == "dist-ft plan chestxray14_densenet121.yaml --json"
    assert rows["import-torch"]["command"] == 'python -c "import torch"'
    assert "pydantic" in rows["plan"]["import_s"]  # the probe saw the recipe loader
    assert isinstance(doc["torch_import_s"], float)
    assert doc["target"]["command"] == "plan" and doc["target"]["seconds"] == 0.5
    table = format_table(doc)
    assert "| `dist-ft plan chestxray14_densenet121.yaml --json` |" in table
    assert "importing torch costs" in table and "target < 0.5 s" in table


def test_bench_cli_names_a_failing_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_speed, "CLI_COMMANDS", {"broken": ("-c", "raise SystemExit(3)")})
    with pytest.raises(RuntimeError, match="exited 3"):
        bench_cli(["broken"], repeats=1)
    with pytest.raises(ValueError, match="unknown command"):
        bench_cli(["nope"], repeats=1)
