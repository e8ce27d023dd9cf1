"""Line styles for plots with many curves: one rule for the ROC plot (a curve per class) and
the aggregate plots (a line per group or optimizer group). Base layer: matplotlib is imported
only when a style is asked for."""

from __future__ import annotations

from typing import Any

DASHES = ("-", "--", ":", "-.")


def line_style(index: int) -> dict[str, Any]:
    """The ``index``-th line's colour and dash: tab20's ten dark hues solid, then their light
    twins dashed, then dotted and dash-dotted (40 distinct lines before any repeats;
    ChestX-ray14's 14 classes are 10 solid and 4 dashed)."""
    from matplotlib import colormaps

    colors = colormaps["tab20"].colors
    k = index % 20
    return {"color": colors[2 * k if k < 10 else 2 * (k - 10) + 1],
            "linestyle": DASHES[(index // 10) % len(DASHES)]}
