"""MixMAE reconstruction pictures: original, mixed input and reconstruction for both images
of a pair."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image

from mixmae_core.masking import mix_images, pair_rows, patch_stats, patchify, unpatchify


@torch.no_grad()
def reconstruction_panels(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    stride: int,
    norm_pix: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Return ``(B * 3, 3, H, W)`` in [0, 1]: per image its original, mixed input and reconstruction.

    ``images`` are the normalised model inputs; ``pred`` and ``mask`` come from ``MixMAEOutput``.
    Norm-pix predictions are mapped back with each target patch's own mean and std.
    """
    images, pred = images.float().cpu(), pred.float().cpu()
    B, C, H, W = images.shape
    grid = (H // stride, W // stride)
    if norm_pix:
        m, s = patch_stats(patchify(images, stride))
        pred = pred * s + m
    recon = unpatchify(pred, stride, grid, C)
    mixed = mix_images(images, pair_rows(mask.cpu()))
    panels = torch.stack([images, mixed, recon], dim=1).flatten(0, 1)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (panels * std_t + mean_t).clamp(0, 1)


def save_reconstruction_png(path: str | os.PathLike, images, pred, mask, stride: int, norm_pix: bool = True, max_pairs: int = 4) -> str:
    """Write a PNG grid: one row per pair, (original, mixed, reconstruction) of row 2k then of 2k+1."""
    n = min(images.shape[0], 2 * max_pairs)
    panels = reconstruction_panels(images[:n], pred[:n], mask[: n // 2], stride, norm_pix)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(panels, nrow=6, padding=2, pad_value=1.0), path)
    return str(path)
