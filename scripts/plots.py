"""Figures on matplotlib's Agg canvas without pyplot: no process-wide backend change, safe headless and in workers."""

from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(**kwargs: Any) -> Figure:
    """A `Figure` (same arguments) that can `savefig` on its own."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
