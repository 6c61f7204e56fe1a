"""Reconstruction pictures of every pretraining method: per image its original, the input the
method's encoder saw (mixed, or masked) and the reconstruction, from ``model.panels``."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image


@torch.no_grad()
def save_reconstruction_png(
    path: str | os.PathLike,
    panels: torch.Tensor,
    max_images: int = 8,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> str:
    """Write ``panels`` ``(B, 3, C, H, W)`` (normalised pixels) as a PNG grid, two images a row
    (rows 2k and 2k+1 of a batch are MixMAE's partners), each as original | input | reconstruction."""
    panels = panels[:max_images].float().cpu().flatten(0, 1)
    pixels = panels * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(pixels.clamp(0, 1), nrow=6, padding=2, pad_value=1.0), path)
    return str(path)
