"""torchvision model factory (``factory``), block maps (``blocks``), weights (``weights``).

``registry`` and ``blocks`` are pure Python; import torch-backed parts from their modules
(``dist_ft.models.factory.build_model``) so that config validation stays torch-free.
"""
