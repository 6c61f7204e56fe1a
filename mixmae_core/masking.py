"""Masks, pairs and patches: the geometry MixMAE and the baselines share.

Conventions used throughout the project:

* Rows ``2k`` and ``2k+1`` of a batch are partners (pair ``k``).
* A mask is boolean, one per pair, on the coarsest token grid (stride 32), shape
  ``(P, h, w)``. ``True`` at a position means that the mixed input of row ``2k`` shows
  row ``2k+1``'s token there; the mixed input of row ``2k+1`` is the complement, so every
  token of both images is visible exactly once across the pair.
* Expanded to rows (``pair_rows``) the same map is also the attention group of every
  token of a mixed input: group 0 tokens come from the row's own image, group 1 from its
  partner; attention never crosses groups.
* A patch vector (``patchify``) is ordered (row, column, channel), as MAE's and the
  official MixMAE code's reconstruction targets.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

MaskMode = Literal["pair", "batch"]


def validate_mask_ratio(ratio: float) -> float:
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {ratio}")
    return float(ratio)


def num_mixed(grid_size: tuple[int, int], ratio: float) -> int:
    """Number of coarse units taken from the partner: ``floor(L * r)``."""
    h, w = grid_size
    k = int(h * w * validate_mask_ratio(ratio))
    if not 0 < k < h * w:
        raise ValueError(f"mask_ratio {ratio} mixes {k} of the {h}x{w} coarse units; it must mix at least one and not all")
    return k


def sample_mask(
    num_pairs: int,
    grid_size: tuple[int, int],
    ratio: float = 0.5,
    *,
    mode: MaskMode = "pair",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw mixing masks with exactly ``floor(h*w*ratio)`` partner units each.

    ``mode="pair"`` draws one mask per pair; ``mode="batch"`` draws one and repeats it
    for every pair, which is what the official implementation does.
    """
    if mode not in ("pair", "batch"):
        raise ValueError(f"mask_mode must be 'pair' or 'batch', got {mode!r}")
    if num_pairs < 1:
        raise ValueError(f"need at least one pair, got {num_pairs}")
    h, w = grid_size
    length = h * w
    k = num_mixed(grid_size, ratio)
    draws = 1 if mode == "batch" else num_pairs
    noise = torch.rand(draws, length, generator=generator, device=device or "cpu")
    ranks = noise.argsort(dim=1).argsort(dim=1)
    mask = (ranks < k).view(draws, h, w)
    if device is not None:
        mask = mask.to(device)
    return mask.expand(num_pairs, h, w).contiguous() if mode == "batch" else mask


def check_even_batch(batch_size: int) -> None:
    if batch_size % 2:
        raise ValueError(
            f"MixMAE mixes rows 2k and 2k+1 of a batch, so the batch size must be even; got {batch_size}"
        )


def normalize_mask(mask: torch.Tensor, num_pairs: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Accept a ``(h, w)`` or ``(P, h, w)`` mask (bool or 0/1) and return a bool ``(P, h, w)``."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(num_pairs, -1, -1)
    expected = (num_pairs, *grid_size)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have shape (h, w)={tuple(grid_size)} or (B//2, h, w)={expected}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("mask values must be 0 or 1")
        mask = mask.bool()
    return mask


def pair_rows(pair_values: torch.Tensor) -> torch.Tensor:
    """Repeat per-pair values for both rows of each pair: ``(P, ...) -> (2P, ...)``."""
    return pair_values.repeat_interleave(2, dim=0)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """Exchange rows ``2k`` and ``2k+1``: row ``b`` of the result is ``b``'s partner."""
    return x.unflatten(0, (-1, 2)).flip(1).flatten(0, 1)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of a ``(N, h, w)`` bool map to ``(N, *size)``."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].to(torch.uint8), size=size, mode="nearest")[:, 0].bool()


def mix_pairs(tokens: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Mix NHWC tokens of partners: where ``row_mask`` is set a row shows its partner's token."""
    return torch.where(row_mask[..., None], swap_pairs(tokens), tokens)


def mix_images(images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The mixed inputs: where ``groups`` ``(B, h, w)`` is set, row b shows its partner's pixels.

    ``images`` are NCHW with sides a multiple of the grid's; the groups are upsampled to pixels.
    """
    pixels = upsample_mask(groups.to(images.device, non_blocking=True), tuple(images.shape[-2:]))[:, None]
    return torch.where(pixels, swap_pairs(images), images)


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


def norm_pix_target(images: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """Pixels patchified at ``patch``; with ``norm_pix`` normalised per patch (unbiased variance)."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return target
