"""Images on disk: uint8 tensors [3, H, W] to and from PNG, and the one grid of them every tool draws.

Small images (32 px shapes samples) are enlarged with nearest-neighbour before they are shown, so each
pixel stays a crisp square instead of a blur; `enlarge` is the one place that does it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ifvit.files import atomic_path

GRID_CELL = 128  # pixels a side at least, per image of a grid


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """uint8 [3, H, W] -> a PNG that appears whole."""
    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    return Path(path)


def load_png(path: str | Path) -> torch.Tensor:
    """Any image file -> uint8 [3, H, W] (RGB)."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def enlarge(images: torch.Tensor, min_side: int = GRID_CELL) -> torch.Tensor:
    """[..., H, W] repeated by the smallest whole factor that makes the side at least `min_side`."""
    factor = max(1, -(-min_side // images.shape[-1]))
    return images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, min_cell: int = GRID_CELL) -> Path:
    """uint8 [B, 3, H, W] as one PNG grid, row-major, `nrow` per row, white 2 px gutters."""
    from torchvision.utils import make_grid

    grid = make_grid(enlarge(images, min_cell), nrow=min(nrow, len(images)), padding=2, pad_value=255)
    return save_png(grid, path)
