"""JSON output stays strict: undefined metrics become null, never a bare NaN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_ft.jsonio import dumps, json_safe


def test_non_finite_values_become_null_everywhere() -> None:
    doc = {"auroc": {"Hernia": float("nan"), "Mass": 0.75}, "inf": [float("inf"), -np.inf],
           "np": np.float32(0.5), "n": np.int64(3), "text": "NaN", "none": None}
    safe = json_safe(doc)
    assert safe == {"auroc": {"Hernia": None, "Mass": 0.75}, "inf": [None, None], "np": 0.5,
                    "n": 3, "text": "NaN", "none": None}
    assert json.loads(dumps(doc)) == safe
    assert "NaN" not in dumps({"x": float("nan")})


def test_python_json_would_have_written_invalid_json() -> None:
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)
