"""torchvision model factory (``factory``), block maps (``blocks``), weights (``weights``),
and the structure the plan engine reads (``structure``: ``ModelSpec``, ``ParamInfo``); timm
models (``timm_backbone``: built by name, blocks from their own ``group_matcher``) and what
input a model expects (``preprocessing``).

``structure`` and ``blocks`` are pure Python (the architecture table is
``dist_ft.config.architectures``); import torch-backed parts from their modules
(``dist_ft.models.factory.build_model``) so that config validation stays torch-free.
"""
