"""Published ChestX-ray14 AUROCs, with the split each was measured on.

Neither row below is a like-for-like target for a model tested on the official test list:
Wang et al. report on it, but with an ImageNet ResNet-50 and weaker training; CheXNet used its
own random patient split. Reports show them as context, with their split said beside them.
"""

from __future__ import annotations

REFERENCES: dict[str, dict] = {
    "Wang et al. 2017": {
        "split": "official test list (patient-wise, 25,596 images)",
        "auroc": {
            "Atelectasis": 0.716, "Cardiomegaly": 0.807, "Consolidation": 0.708, "Edema": 0.835,
            "Effusion": 0.784, "Emphysema": 0.815, "Fibrosis": 0.769, "Hernia": 0.767,
            "Infiltration": 0.609, "Mass": 0.706, "Nodule": 0.671, "Pleural_Thickening": 0.708,
            "Pneumonia": 0.633, "Pneumothorax": 0.806,
        },
    },
    "CheXNet 2017": {  # Rajpurkar et al. 2017, Table 1
        "split": "random 70/10/20 patient split (not the official test list)",
        "auroc": {
            "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Consolidation": 0.7901,
            "Edema": 0.8878, "Effusion": 0.8638, "Emphysema": 0.9371, "Fibrosis": 0.8047,
            "Hernia": 0.9164, "Infiltration": 0.7345, "Mass": 0.8676, "Nodule": 0.7802,
            "Pleural_Thickening": 0.8062, "Pneumonia": 0.7680, "Pneumothorax": 0.8887,
        },
    },
}

OFFICIAL_SPLIT_NOTE = (
    "DenseNet-121 models trained on the official train/val list and tested on the official "
    "test list typically report a mean AUROC of about 0.80-0.83 over the 14 findings, below "
    "CheXNet's 0.841 on its random split; that range, not CheXNet's per-finding numbers, is "
    "the fair yardstick for a run on the official split."
)
