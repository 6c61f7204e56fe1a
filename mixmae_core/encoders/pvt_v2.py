"""PVTv2 under MixMAE's encoder contract (``mixmae_core/mixmae.py``).

PVTv2 (Wang et al., 2022) embeds patches with overlapping convolutions (7x7 stride 4, then
3x3 stride 2 between levels), attends to keys reduced by a strided convolution (spatial
reduction 8, 4, 2, 1) and has a 3x3 depthwise convolution inside every MLP. Parameter
names are timm's ``pvt_v2_*``: ``mixmae_pvt_v2_b2`` holds exactly timm's ``pvt_v2_b2``.

What keeps each image of a mixed input apart:

* reduced keys: with sr 8, 4, 2, 1 at strides 4, 8, 16, 32 a key summarises one 32-px mask
  unit, so it belongs to one image; queries see their own image's keys only
  (``attention.check_reduction_grid`` refuses other ratios);
* the overlapping patch embeddings between levels and the MLPs' depthwise convolutions
  cross unit borders: they run per group (``convs.per_group``), so the partner's tokens
  count as zero padding; each of those convolutions costs twice its FLOPs in pretraining;
* the 7x7 stem reads 3 pixels across unit borders: given the groups it also runs per group,
  so a token never reads pixels its mixed input hides (the reconstruction targets).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm
from timm.models import register_model
from timm.models.pvt_v2 import MlpWithDepthwiseConv, OverlapPatchEmbed, PyramidVisionTransformerV2

from mixmae_core.encoders.attention import (
    AttentionImpl,
    SpatialReductionAttention,
    check_reduction_grid,
    reduction_context,
)
from mixmae_core.encoders.base import HierarchicalEncoder, build_encoder, default_cfgs_for, on_device_of, run_block
from mixmae_core.encoders.convs import per_group


class PVTBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool, drop_path: float,
        proj_drop: float = 0.0, attn_drop: float = 0.0,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = MlpWithDepthwiseConv(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mlp(self, x: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        mlp = self.mlp
        x = mlp.relu(mlp.fc1(x)).permute(0, 3, 1, 2)
        x = mlp.drop(mlp.act(per_group(mlp.dwconv, x, groups).permute(0, 2, 3, 1)))
        return mlp.drop(mlp.fc2(x))

    def forward(self, x: torch.Tensor, impl, context, groups: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), impl, context))
        return x + self.drop_path2(self._mlp(self.norm2(x), groups))


class PVTLevel(nn.Module):
    """Overlapping patch merging (levels 2-4), blocks, and the level's norm (timm's stage)."""

    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, sr_ratio: int, drop_path, **block_kwargs):
        super().__init__()
        self.sr_ratio = sr_ratio
        self.grad_checkpointing = False
        self.downsample = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=dim, embed_dim=dim_out) if downsample else None
        self.blocks = nn.ModuleList(
            PVTBlock(dim_out, sr_ratio=sr_ratio, drop_path=drop_path[i], **block_kwargs) for i in range(depth)
        )
        self.norm = LayerNorm(dim_out)

    def forward(self, x: torch.Tensor, attention: AttentionImpl, groups: Optional[torch.Tensor]) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample.norm(per_group(self.downsample.proj, x.permute(0, 3, 1, 2), groups).permute(0, 2, 3, 1))
        context = reduction_context(attention, x, self.sr_ratio, groups)
        for block in self.blocks:
            x = run_block(block, x, attention, context, groups, grad_checkpointing=self.grad_checkpointing)
        return self.norm(x)


class MixMAEPVTv2(HierarchicalEncoder):
    """PVTv2 (no linear-attention variants: their 7x7 pooling mixes units) with every token
    mixer kept inside its group."""

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (3, 4, 6, 3),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_impl: str = "sdpa",
        **kwargs,
    ):
        num_levels = len(depths)
        super().__init__(img_size, 4 * 2 ** (num_levels - 1), num_classes, global_pool, attn_impl, kwargs)
        for i, sr in enumerate(sr_ratios):
            check_reduction_grid(i, 4 * 2**i, sr, unit=self.stride)
        self.patch_embed = OverlapPatchEmbed(patch_size=7, stride=4, in_chans=in_chans, embed_dim=embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential(
            *(
                PVTLevel(
                    embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], i > 0, sr_ratios[i], dpr[i].tolist(),
                    num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                )
                for i in range(num_levels)
            )
        )
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(num_levels)
        ]
        self.norm = nn.Identity()  # each level ends with its own norm: the last one is the final norm
        self._init_head(embed_dims[-1], drop_rate)
        self.apply(partial(PyramidVisionTransformerV2._init_weights, self))

    # ----------------------------------------------------------------- timm protocol (the rest is base.py's)
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """A layer per block (a merge with its level's first block), the head with the last
        block (MixMAE's rule); timm's own matcher groups whole levels."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)")
        return dict(
            stem=r"^patch_embed",
            blocks=[
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
                (r"^head", (99999,)),
            ],
        )

    # ----------------------------------------------------------------- the stem and the levels
    def _stem(self, images: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        """The 7x7 stride-4 convolution, per group: each token reads only pixels of units in
        its own group."""
        groups = on_device_of(images, groups)
        return self.patch_embed.norm(per_group(self.patch_embed.proj, images, groups).permute(0, 2, 3, 1))

    def _levels(
        self, x: torch.Tensor, groups: Optional[torch.Tensor], stop: Optional[int] = None
    ) -> Iterator[torch.Tensor]:
        groups = on_device_of(x, groups)
        for level in self.stages[:stop]:
            x = level(x, self.attention, groups)
            yield x


# --------------------------------------------------------------------- timm registration


_NAMES = ("micro", "b0", "b1", "b2", "b3", "b4", "b5")
default_cfgs = default_cfgs_for(
    {f"mixmae_pvt_v2_{n}": 64 if n == "micro" else 224 for n in _NAMES}, first_conv="patch_embed.proj", crop_pct=0.9
)
_B1_5 = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))


@register_model
def mixmae_pvt_v2_micro(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """Tests and the CPU quickstart: 64 px, the widths of the micro Swin and Twins."""
    args = dict(img_size=64, depths=(2, 2, 2, 2), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_micro", pretrained, args, **kwargs)


@register_model
def mixmae_pvt_v2_b0(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B0 (3.7M parameters, 0.6 GFLOPs at 224), timm's ``pvt_v2_b0``."""
    args = dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8))
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b0", pretrained, args, **kwargs)


@register_model
def mixmae_pvt_v2_b1(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B1 (14M parameters), timm's ``pvt_v2_b1``."""
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b1", pretrained, dict(depths=(2, 2, 2, 2), **_B1_5), **kwargs)


@register_model
def mixmae_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B2 (25M parameters, 4.0 GFLOPs at 224), timm's ``pvt_v2_b2``."""
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b2", pretrained, dict(depths=(3, 4, 6, 3), **_B1_5), **kwargs)


@register_model
def mixmae_pvt_v2_b3(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B3 (45M parameters), timm's ``pvt_v2_b3``."""
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b3", pretrained, dict(depths=(3, 4, 18, 3), **_B1_5), **kwargs)


@register_model
def mixmae_pvt_v2_b4(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B4 (63M parameters), timm's ``pvt_v2_b4``."""
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b4", pretrained, dict(depths=(3, 8, 27, 3), **_B1_5), **kwargs)


@register_model
def mixmae_pvt_v2_b5(pretrained: bool = False, **kwargs: Any) -> MixMAEPVTv2:
    """PVTv2-B5 (82M parameters), timm's ``pvt_v2_b5``."""
    args = dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4), **_B1_5)
    return build_encoder(MixMAEPVTv2, "mixmae_pvt_v2_b5", pretrained, args, **kwargs)
