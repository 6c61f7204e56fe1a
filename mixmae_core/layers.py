"""What methods and encoders share: MAE's fixed 2-D sin-cos position table (and its
bicubic resizing, as the official fine-tuning does it) and MAE's weight initialisation.

The table's layout (``[sin(x), cos(x), sin(y), cos(y)]`` over a quarter of the channels
each, x the column index) is the one of MAE and of the official MixMAE code, so converted
official checkpoints see exactly the embedding they were trained with. timm's
``build_sincos2d_pos_embed`` orders the channels differently, hence this helper.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Return a ``(h, w, dim)`` float32 embedding."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    h, w = grid_size
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (xs, ys):
        angles = coord[..., None] * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1).float()


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linears with zero bias, unit LayerNorms: MAE's and the official MixMAE
    code's initialisation (``model.apply(init_weights)``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def interpolate_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``(h, w, C)`` position table resized to ``grid`` bicubically, as the official
    fine-tuning's ``interpolate_pos_embed`` does."""
    if tuple(table.shape[:2]) == tuple(grid):
        return table
    resized = torch.nn.functional.interpolate(
        table.permute(2, 0, 1)[None].float(), size=tuple(grid), mode="bicubic", align_corners=False
    )
    return resized[0].permute(1, 2, 0).to(table.dtype)
