"""Scored checks its arrays once, naming the field, row and fix."""

from __future__ import annotations

import numpy as np
import pytest

from dist_ft.evaluation.scored import Scored


def _args(**change):
    args = {"scores": np.full((3, 2), 0.5), "targets": np.zeros((3, 2)), "classes": ["a", "b"],
            "patients": np.array(["p", "p", "q"]), "images": np.array(["i1", "i2", "i3"]),
            "meta": {}}
    return {**args, **change}


@pytest.mark.parametrize(("change", "message"), [
    ({"scores": np.full((3, 3), 0.5)}, r"Scored.targets: expected shape \(3, 3\)"),
    ({"classes": ["a"]}, "1 names for 2 score columns"),
    ({"classes": ["a", "a"]}, "duplicate names"),
    ({"scores": np.array([[0.5, 0.5], [0.5, 2.0], [0.5, 0.5]])},
     r"first at row 1 \(b\): 2.0; apply a sigmoid"),
    ({"targets": np.array([[0, 0], [0, 0], [0.5, 0]])},
     r"not 0, 1 or NaN \(unknown\), first at row 2 \(a\)"),
    ({"targets": np.array([[0, 0], [np.nan, -1], [0, 0]])}, r"1 values .* row 1 \(b\): -1"),
    ({"scores": np.array([[0.5, 0.5], [0.5, 0.5], [np.nan, 0.5]])},
     r"first at row 2 \(a\): nan"),
    ({"patients": np.array(["p", "q"])}, r"Scored.patients: expected shape \(3,\)"),
    ({"images": np.array(["i1", "i1", "i3"])}, "1 ids repeat, e.g. 'i1'"),
    ({"meta": {"weight": np.zeros(3)}}, "unknown column 'weight'"),
    ({"meta": {"age": np.array(["x", "1", "2"])}}, r"meta\['age'\]: not numeric"),
])
def test_bad_input_is_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scored(**_args(**change))


def test_valid_input_is_normalised() -> None:
    scored = Scored(**_args(targets=np.zeros((3, 2), dtype=int),
                            meta={"age": [1, None, 3], "sex": ["M", "F", "M"]}))
    assert scored.targets.dtype == np.float64 and len(scored) == 3
    assert np.isnan(scored.meta["age"][1])
    assert scored.take(np.array([True, False, True])).images.tolist() == ["i1", "i3"]


def test_nan_targets_are_unknown_entries() -> None:
    targets = np.array([[0, np.nan], [1, 0], [np.nan, np.nan]])
    scored = Scored(**_args(targets=targets))
    assert scored.known.tolist() == [[True, False], [True, True], [False, False]]
    assert np.isnan(scored.take(np.array([2])).targets).all()
