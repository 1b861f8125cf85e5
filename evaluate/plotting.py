"""Headless figures shared by the analysis modules (compare, attention, human).

Figures use matplotlib's object-oriented API (no pyplot global state, no display backend), and every PNG
appears whole (ifvit.files.atomic_path), so an interrupted report never leaves a truncated file that a
later reader would trust.
"""
from __future__ import annotations

import os
from pathlib import Path

from ifvit.files import atomic_path


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
