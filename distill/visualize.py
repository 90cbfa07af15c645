"""Draw a synthetic set as a PNG grid, one row per class: people look at synthetic images."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .data import denormalise
from .synthetic import SyntheticSet


def set_grid(syn: SyntheticSet, pad: int = 2) -> torch.Tensor:
    """``[3, H', W']`` float grid in [0, 1]; rows are classes, short rows padded with blanks."""
    info = syn.meta.dataset
    images = denormalise(syn.images.detach().cpu(), info)
    if info.channels == 1:
        images = images.repeat(1, 3, 1, 1)
    labels = syn.hard_labels().cpu()
    classes = [c for c in range(info.num_classes) if (labels == c).any()]
    per_row = max(int((labels == c).sum()) for c in classes)
    blank = torch.ones(3, info.height, info.width)
    tiles = []
    for c in classes:
        row = list(images[labels == c])
        tiles += row + [blank] * (per_row - len(row))
    return make_grid(torch.stack(tiles), nrow=per_row, padding=pad, pad_value=1.0)


def save_grid(syn: SyntheticSet, path: str | Path, scale: int = 3) -> Path:
    """Write the grid as PNG, each pixel drawn ``scale`` x ``scale`` for legibility."""
    grid = (set_grid(syn) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
