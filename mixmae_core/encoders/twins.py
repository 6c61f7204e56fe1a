"""Twins-SVT under MixMAE's encoder contract (``mixmae_core/mixmae.py``).

Twins-SVT (Chu et al., NeurIPS 2021) alternates locally-grouped attention (windows) with
global attention over keys sub-sampled by a strided convolution, adds a depthwise-conv
position generator (PEG) after each level's first block, and merges levels with
non-overlapping patch embeddings. Parameter names are timm's ``twins_svt_*``, so
``mixmae_twins_svt_small`` holds exactly the parameters of timm's ``twins_svt_small``.

What keeps each image of a mixed input apart:

* windows: segment-masked like Swin's (``attention.windows_for``);
* sub-sampled keys: a key summarises ``sr x sr`` tokens; with sr 8, 4, 2, 1 at strides
  4, 8, 16, 32 that is one 32-px mask unit, so each key belongs to one image and queries
  see their own image's keys only (``attention.check_reduction_grid`` refuses other ratios);
* the PEG's 3x3 depthwise convolution crosses unit borders: it runs per group
  (``convs.per_group``), twice the cost of that small convolution;
* patch embeddings: 4x4 then 2x2 patches, inside one unit each.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp
from timm.models import register_model
from timm.models.twins import PatchEmbed, PosConv, Twins

from mixmae_core.encoders.attention import (
    SpatialReductionAttention,
    WindowAttention,
    check_reduction_grid,
    reduction_context,
    windows_for,
)
from mixmae_core.encoders.base import HierarchicalEncoder, build_encoder, default_cfgs_for, on_device_of, run_block
from mixmae_core.encoders.convs import per_group


class TwinsBlock(nn.Module):
    """Pre-norm block with locally-grouped (``window > 1``) or global sub-sampled attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window: int, sr_ratio: int, drop_path: float,
        norm_layer, proj_drop: float = 0.0, attn_drop: float = 0.0,
    ):
        super().__init__()
        self.local = window > 1
        self.norm1 = norm_layer(dim)
        if self.local:
            self.attn = WindowAttention(dim, num_heads, (window, window), True, attn_drop, proj_drop, position_bias=False)
        else:
            self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, True, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, impl, contexts: dict) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``; ``contexts``: the level's window layout and prepared contexts."""
        y = self.norm1(x)
        if self.local:
            layout, context = contexts["windows"]
            y = layout.scatter(self.attn(layout.gather(y), impl, context, None), y.shape)
        else:
            y = self.attn(y, impl, contexts["global"])
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MixMAETwins(HierarchicalEncoder):
    """Twins-SVT with every token mixer kept inside its group."""

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        depths: Sequence[int] = (2, 2, 10, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        wss: Sequence[int] = (7, 7, 7, 7),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_impl: str = "sdpa",
        **kwargs,
    ):
        num_levels = len(depths)
        super().__init__(img_size, patch_size * 2 ** (num_levels - 1), num_classes, global_pool, attn_impl, kwargs)
        for i, sr in enumerate(sr_ratios):
            check_reduction_grid(i, patch_size * 2**i, sr, unit=self.stride)
        self.wss, self.sr_ratios = tuple(wss), tuple(sr_ratios)
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        size, prev = self.img_size, in_chans
        self.patch_embeds = nn.ModuleList()
        for i in range(num_levels):
            patch = patch_size if i == 0 else 2
            self.patch_embeds.append(PatchEmbed(size, patch, prev, embed_dims[i]))
            size, prev = (size[0] // patch, size[1] // patch), embed_dims[i]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.blocks = nn.ModuleList()
        self.feature_info = []
        for k in range(num_levels):
            first = sum(depths[:k])
            self.blocks.append(nn.ModuleList(
                TwinsBlock(
                    embed_dims[k], num_heads[k], mlp_ratios[k], 1 if i % 2 else wss[k], sr_ratios[k], dpr[first + i],
                    norm_layer, proj_drop_rate, attn_drop_rate,
                )
                for i in range(depths[k])
            ))
            self.feature_info.append(dict(num_chs=embed_dims[k], reduction=patch_size * 2**k, module=f"blocks.{k}"))
        self.pos_block = nn.ModuleList(PosConv(dim, dim) for dim in embed_dims)
        self.norm = norm_layer(embed_dims[-1])
        self._init_head(embed_dims[-1], drop_rate)
        self.apply(partial(Twins._init_weights, self))

    # ----------------------------------------------------------------- timm protocol (the rest is base.py's)
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_block." + n for n, _ in self.pos_block.named_parameters()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's Twins groups, with the head joining the final norm and last block (MixMAE's rule)."""
        matcher = Twins.group_matcher(self, coarse)
        matcher["blocks"].append((r"^head", (99999,)))
        return matcher

    # ----------------------------------------------------------------- the stem and the levels
    def _stem(self, images: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        """A token reads one 4x4 patch, inside one 32-px unit, so it never reads another
        group's pixels anyway."""
        return self._patch_embed(0, images)

    def _patch_embed(self, level: int, x: torch.Tensor) -> torch.Tensor:
        embed = self.patch_embeds[level]
        return embed.norm(embed.proj(x).permute(0, 2, 3, 1))

    def _levels(
        self, x: torch.Tensor, groups: Optional[torch.Tensor], stop: Optional[int] = None
    ) -> Iterator[torch.Tensor]:
        groups = on_device_of(x, groups)
        for k, blocks in enumerate(self.blocks[:stop]):
            if k:
                x = self._patch_embed(k, x.permute(0, 3, 1, 2))
            contexts = {}  # computed once per level, shared by its blocks
            if any(block.local for block in blocks):
                contexts["windows"] = windows_for(self.attention, x, (self.wss[k], self.wss[k]), groups)
            if not all(block.local for block in blocks):
                contexts["global"] = reduction_context(self.attention, x, self.sr_ratios[k], groups)
            for j, block in enumerate(blocks):
                x = run_block(block, x, self.attention, contexts, grad_checkpointing=self.grad_checkpointing)
                if j == 0:  # the PEG: a depthwise 3x3 convolution, per group
                    nchw = x.permute(0, 3, 1, 2)
                    x = (per_group(self.pos_block[k].proj, nchw, groups) + nchw).permute(0, 2, 3, 1)
            yield x


# --------------------------------------------------------------------- timm registration


default_cfgs = default_cfgs_for(
    {
        "mixmae_twins_svt_micro": 64,
        "mixmae_twins_svt_small": 224,
        "mixmae_twins_svt_base": 224,
        "mixmae_twins_svt_large": 224,
    },
    first_conv="patch_embeds.0.proj",
    crop_pct=0.9,
)


@register_model
def mixmae_twins_svt_micro(pretrained: bool = False, **kwargs: Any) -> MixMAETwins:
    """Tests and the CPU quickstart: 64 px, windows of 8 tokens (one mask unit at level 1)."""
    args = dict(img_size=64, embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2), wss=(8, 8, 8, 8))
    return build_encoder(MixMAETwins, "mixmae_twins_svt_micro", pretrained, args, **kwargs)


@register_model
def mixmae_twins_svt_small(pretrained: bool = False, **kwargs: Any) -> MixMAETwins:
    """Twins-SVT-S (24M parameters, 2.9 GFLOPs at 224), timm's ``twins_svt_small``."""
    args = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 2, 10, 4))
    return build_encoder(MixMAETwins, "mixmae_twins_svt_small", pretrained, args, **kwargs)


@register_model
def mixmae_twins_svt_base(pretrained: bool = False, **kwargs: Any) -> MixMAETwins:
    """Twins-SVT-B (56M parameters, 8.6 GFLOPs at 224), timm's ``twins_svt_base``."""
    args = dict(embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), depths=(2, 2, 18, 2))
    return build_encoder(MixMAETwins, "mixmae_twins_svt_base", pretrained, args, **kwargs)


@register_model
def mixmae_twins_svt_large(pretrained: bool = False, **kwargs: Any) -> MixMAETwins:
    """Twins-SVT-L (99M parameters, 15.1 GFLOPs at 224), timm's ``twins_svt_large``."""
    args = dict(embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), depths=(2, 2, 18, 2))
    return build_encoder(MixMAETwins, "mixmae_twins_svt_large", pretrained, args, **kwargs)
