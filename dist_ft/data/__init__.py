"""Datasets: ChestX-ray14 metadata, splits and images; the preprocessed cache; the synthetic
twin; ImageFolder and multi-label CSV datasets; sharded epoch sampling.

``findings``, ``metadata``, ``splits`` and ``stats`` are pure (no torch).
"""
