"""Norm-pix reconstruction targets and loss."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, patch * patch * C)``, each vector ordered (row, col, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    B = patches.shape[0]
    h, w = grid_size
    x = patches.reshape(B, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * patch, w * patch)


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance, as MAE and the official MixMAE code)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def reconstruction_target(images: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    target = patchify(images.float(), patch)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return target


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every value: each (image, patch) appears once in ``pred``."""
    return (pred.float() - target).pow(2).mean()
