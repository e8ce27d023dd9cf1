"""The 14 ChestX-ray14 findings, in the one fixed order dist-ft uses everywhere.

The order is the alphabetical one of the NIH release notes (and of CheXNet's label vector):
column ``k`` of every label matrix, model output and AUROC table is ``FINDINGS[k]``.
``No Finding`` is not a class: it is the all-zeros row.
"""

from __future__ import annotations

import difflib

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
_INDEX = {name: i for i, name in enumerate(FINDINGS)}


class UnknownFindingError(ValueError):
    """A ``Finding Labels`` entry names something that is not one of the 14 findings."""


def encode_findings(text: str) -> np.ndarray:
    """``"Cardiomegaly|Effusion"`` -> a uint8 multi-hot vector of length 14.

    Raises:
        UnknownFindingError: an entry is neither a finding nor ``No Finding`` (the message
            suggests the nearest finding, e.g. ``Infiltrate`` -> ``Infiltration``).
    """
    out = np.zeros(len(FINDINGS), dtype=np.uint8)
    for raw in text.split("|"):
        name = raw.strip()
        if name == NO_FINDING:
            continue
        index = _INDEX.get(name)
        if index is None:
            close = difflib.get_close_matches(name, [*FINDINGS, NO_FINDING], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownFindingError(f"unknown finding {name!r}{hint}")
        out[index] = 1
    return out
