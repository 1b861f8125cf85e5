"""Headless figures and atomic writes shared by the analysis modules (compare, attention, human).

Figures use matplotlib's object-oriented API (no pyplot global state, no display backend), and every
file appears whole: written under a temporary name, then `os.replace`d, so an interrupted report never
leaves a truncated PNG or JSON that a later reader would trust.
"""
from __future__ import annotations

import os
from pathlib import Path


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
