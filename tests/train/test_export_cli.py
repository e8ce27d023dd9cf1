"""``dist-ft export``: TorchScript and ONNX match PyTorch within 1e-4; int8 variant reported."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CliResult
from tests.train.test_eval_cli import _run_dir


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch_and_quantizes(
    run_cli: Callable[..., CliResult], tiny_cxr14_session: Path, tmp_path: Path, fmt: str
) -> None:
    weights = _run_dir(tmp_path, tiny_cxr14_session)
    result = run_cli("export", str(weights), "--format", fmt, "--quantize", "dynamic", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["max_abs_error"] <= 1e-4
    assert Path(report["path"]).is_file() and report["bytes"] > 1_000_000
    int8 = report["int8"]
    assert Path(int8["path"]).is_file()
    assert int8["auroc"]["images"] > 0 and abs(int8["auroc"]["change"]) < 0.2
    if fmt == "onnx":  # every conv and linear weight in int8: about a quarter of the size
        assert int8["bytes"] < 0.35 * report["bytes"]
