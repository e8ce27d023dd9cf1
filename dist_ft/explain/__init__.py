"""Explain and localize: Grad-CAM heatmaps, bounding-box scores, predictions on image files.

Above ``data``, ``models``, ``evaluation`` and ``config``; beside ``train`` (never imports it).
"""
