"""CheXpert-labeller findings (CheXpert, MIMIC-CXR-JPG), uncertain labels, and the findings
they share with ChestX-ray14.

Both CheXpert and MIMIC-CXR-JPG label 14 observations with the CheXpert labeller: 1 positive,
0 negative, -1 uncertain, blank not mentioned. Blank becomes 0; -1 follows the policy of
Irvin et al. 2019 (U-Ones, U-Zeros, U-Ignore), per finding if wanted. Ignored entries are NaN
in the targets: the loss and the metrics leave them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dist_ft.config.schema import ChexpertLabelsConfig
from dist_ft.data.findings import FINDINGS
from dist_ft.data.metadata import MetadataError

# Column order of the CheXpert CSVs (and of MIMIC-CXR-JPG's mimic-cxr-2.0.0-chexpert.csv).
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# ChestX-ray14 finding -> CheXpert finding, for the findings both define the same way.
# Not mapped, because the definitions differ: Mass and Nodule (size-defined lesions) are both
# inside CheXpert's broader "Lung Lesion"; Infiltration has no CheXpert class ("Lung Opacity"
# also covers edema, consolidation and atelectasis); Pleural_Thickening is one of several
# things in "Pleural Other"; Emphysema, Fibrosis and Hernia have no counterpart; and "No
# Finding" is not a ChestX-ray14 class (it is the all-zeros row there).
CHESTXRAY14_TO_CHEXPERT: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
# The shared findings in ChestX-ray14's order (the order of a ChestX-ray14 model's outputs).
SHARED_CHESTXRAY14: tuple[str, ...] = tuple(f for f in FINDINGS if f in CHESTXRAY14_TO_CHEXPERT)

_POLICY_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}


def uncertain_values(cfg: ChexpertLabelsConfig, source: str = "data.chexpert") -> np.ndarray:
    """The value -1 becomes in each CheXpert column: 1, 0 or NaN (ignored).

    Raises:
        MetadataError: ``per_finding`` names a column that is not a CheXpert finding.
    """
    unknown = [k for k in cfg.per_finding if k not in CHEXPERT_FINDINGS]
    if unknown:
        raise MetadataError(f"{source}.per_finding: unknown finding(s) "
                            f"{', '.join(map(repr, unknown))}; the findings are "
                            f"{', '.join(CHEXPERT_FINDINGS)}")
    return np.array([_POLICY_VALUE[cfg.per_finding.get(f, cfg.uncertain)]
                     for f in CHEXPERT_FINDINGS], dtype=np.float32)


def parse_chexpert_value(text: str) -> float:
    """``'1.0'``/``'1'`` -> 1, ``'0.0'`` -> 0, ``'-1.0'`` -> -1, blank -> 0 (not mentioned).

    Raises:
        ValueError: any other text.
    """
    text = text.strip()
    if not text:
        return 0.0
    value = float(text)
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"expected 1, 0, -1 or blank, got {text!r}")
    return value


def apply_uncertain(raw: np.ndarray, cfg: ChexpertLabelsConfig) -> np.ndarray:
    """``[N, 14]`` raw values (1/0/-1) -> float32 targets under the uncertain policy."""
    values = uncertain_values(cfg)
    out = np.asarray(raw, dtype=np.float32).copy()
    uncertain = out == -1
    out[uncertain] = np.broadcast_to(values, out.shape)[uncertain]
    return out


def as_chestxray14(targets: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Targets of CheXpert-named ``classes`` presented as the shared ChestX-ray14 findings.

    Returns:
        ``(targets[:, k], names)`` with ``names`` = :data:`SHARED_CHESTXRAY14` (ChestX-ray14
        spelling and order), so an evaluator matches a ChestX-ray14 model's outputs by name.
    """
    column = {name: i for i, name in enumerate(classes)}
    picks = [column[CHESTXRAY14_TO_CHEXPERT[f]] for f in SHARED_CHESTXRAY14]
    return targets[:, picks], list(SHARED_CHESTXRAY14)
