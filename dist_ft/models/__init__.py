"""torchvision model factory (``factory``), block maps (``blocks``), weights (``weights``),
and the structure the plan engine reads (``structure``: ``ModelSpec``, ``ParamInfo``).

``structure`` and ``blocks`` are pure Python (the architecture table is
``dist_ft.config.architectures``); import torch-backed parts from their modules
(``dist_ft.models.factory.build_model``) so that config validation stays torch-free.
"""
