"""MixMAE's Swin: Swin without shifted windows, every attention masked per image.

One class serves pretraining (``embed`` + ``forward_tokens(x, groups)``: the encoder
contract of ``mixmae_core/mixmae.py``), classification (``forward``) and dense heads
(``forward_intermediates`` / ``timm.create_model(..., features_only=True)``); those methods
are ``encoders/base.py``'s, over this file's stem and levels.

Every window attention runs through ``mixmae_core.encoders.attention`` with the groups as
segments; patch merging concatenates 2x2 tokens, which never straddle a 32-px mask unit
at stride 4-16, so nothing else moves information between images.

Variants (``@register_model`` below): micro (tests, the CPU quickstart), tiny, base, large
and huge with windows 14,14,14,7 at 224 (stages 3-4 global), base and large with windows
16,16,24,12 at 384 for fine-tuning.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models import register_model
from timm.models.swin_transformer import PatchMerging

from mixmae_core.encoders.attention import (
    AttentionContext,
    AttentionImpl,
    SequenceLayout,
    WindowAttention,
    group_layout,
    window_layout,
)
from mixmae_core.encoders.base import HierarchicalEncoder, build_encoder, default_cfgs_for, on_device_of, run_block
from mixmae_core.layers import init_weights, interpolate_table, sincos_2d
from mixmae_core.masking import upsample_mask


def level_windows(
    img_size: tuple[int, int], patch_size: int, window_size: Sequence[int], strict: bool = True
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per level ``(resolution, window)``; a window larger than its map is clamped to it.

    With ``strict`` raises a ValueError naming the level when the image does not tile
    into windows; otherwise such maps are padded to whole windows at run time.
    """
    stride = patch_size * 2 ** (len(window_size) - 1)
    if img_size[0] % stride or img_size[1] % stride:
        raise ValueError(
            f"img_size {tuple(img_size)} must be a multiple of the encoder stride {stride} "
            f"(patch {patch_size} x 2^{len(window_size) - 1} merges)"
        )
    out = []
    for i, win in enumerate(window_size):
        res = (img_size[0] // (patch_size * 2**i), img_size[1] // (patch_size * 2**i))
        win_hw = (min(win, res[0]), min(win, res[1]))
        if strict and (res[0] % win_hw[0] or res[1] % win_hw[1]):
            raise ValueError(
                f"stage {i + 1} has a {res[0]}x{res[1]} token map at img_size {tuple(img_size)}, which window "
                f"{win} does not tile; choose window_size[{i}] dividing {res[0]} and {res[1]} (or >= them)"
            )
        out.append((res, win_hw))
    return out


class SwinBlock(nn.Module):
    """Pre-norm transformer block on a level's window (or group) sequences ``(S, n, C)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, impl, context: AttentionContext, rel_bias: torch.Tensor) -> torch.Tensor:
        """``rel_bias``: this block's ``attn.relative_bias()``, passed in so that a compiled
        block sees it as an input (FlexAttention can then read it inside its kernel)."""
        x = x + self.drop_path1(self.attn(self.norm1(x), impl, context, rel_bias))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinLevel(nn.Module):
    """Patch merging (levels 2-4), then blocks on one layout of the level's map."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window: tuple[int, int],
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer: type[nn.Module] = nn.LayerNorm,
        split_groups: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        self.window_size = window
        self.split_groups = split_groups
        self.grad_checkpointing = False
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)
        )

    def layout(self, x: torch.Tensor, segments: Optional[torch.Tensor], partner_tokens: Optional[int]) -> SequenceLayout:
        B, H, W, _ = x.shape
        covers_map = (H, W) == tuple(self.window_size)
        if self.split_groups and covers_map and segments is not None and partner_tokens and partner_tokens < H * W:
            return group_layout(B, H, W, segments, partner_tokens)
        return window_layout(B, H, W, self.window_size, segments, x.device)

    def forward(
        self,
        x: torch.Tensor,
        attention: AttentionImpl,
        segments: Optional[torch.Tensor] = None,
        partner_tokens: Optional[int] = None,
    ) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` before merging; ``segments``: ``(B, H', W')`` uint8 at this
        level's resolution or None; ``partner_tokens``: partner tokens per row if equal for all rows."""
        x = self.downsample(x)
        layout = self.layout(x, segments, partner_tokens)
        context = attention.prepare(AttentionContext(segments=layout.segments, positions=layout.positions))
        seq = layout.gather(x)
        for block in self.blocks:
            seq = run_block(
                block, seq, attention, context, block.attn.relative_bias(), grad_checkpointing=self.grad_checkpointing
            )
        return layout.scatter(seq, x.shape)


class MixMAESwin(HierarchicalEncoder):
    """Swin-style hierarchical encoder without shifted windows (MixMAE's backbone)."""

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: Union[int, Sequence[int]] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attn_impl: str = "sdpa",
        split_groups: bool = False,
        strict_windows: bool = True,
        **kwargs,
    ):
        """``attn_impl``: "reference", "sdpa" or "flex". ``split_groups``: in pretraining, run
        levels whose window covers the map as one sequence per (image, group).
        ``strict_windows=False`` (dense tasks) pads level maps that windows do not tile, as
        Swin detection backbones do, instead of refusing the size."""
        num_levels = len(depths)
        super().__init__(img_size, patch_size * 2 ** (num_levels - 1), num_classes, global_pool, attn_impl, kwargs)
        if len(num_heads) != num_levels:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if isinstance(window_size, int):
            window_size = (window_size,) * num_levels
        if len(window_size) != num_levels:
            raise ValueError(f"window_size {tuple(window_size)} needs one entry per stage ({num_levels})")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.window_size = tuple(window_size)
        geometry = level_windows(self.img_size, patch_size, self.window_size, strict_windows)

        self.patch_embed = PatchEmbed(
            img_size=self.img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        # a buffer in the state dict: fine-tuning at another size interpolates the pretrained one
        self.register_buffer("absolute_pos_embed", sincos_2d(geometry[0][0], embed_dim))

        dims = [embed_dim * 2**i for i in range(num_levels)]
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_levels):
            self.layers.append(
                SwinLevel(
                    in_dim=dims[max(i - 1, 0)],
                    dim=dims[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window=geometry[i][1],
                    downsample=i > 0,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    norm_layer=norm_layer,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    split_groups=split_groups,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.norm = norm_layer(dims[-1])
        self._init_head(dims[-1], drop_rate)
        self.apply(init_weights)

    # ----------------------------------------------------------------- timm protocol (the rest is base.py's)
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids as MixMAE's fine-tuning assigns them: a merge with the next level's first
        block, the final norm and the head with the last block."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm|^head", (99999,)),
            ],
        )

    def set_split_groups(self, enable: bool) -> None:
        for level in self.layers:
            level.split_groups = enable

    # ----------------------------------------------------------------- the stem and the levels
    def _stem(self, images: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        """A token reads one 4x4 patch, inside one 32-px unit, so it never reads another
        group's pixels anyway."""
        return self.patch_embed(images)

    def _levels(
        self, x: torch.Tensor, groups: Optional[torch.Tensor], stop: Optional[int] = None
    ) -> Iterator[torch.Tensor]:
        """The position table is added to the stem tokens here, after MixMAE has mixed them."""
        partner_units = None
        if groups is not None:
            # counted where the groups live: free for CPU masks, one sync for device masks
            counts = groups.flatten(1).sum(1)
            partner_units = int(counts[0]) if bool((counts == counts[0]).all()) else None
            groups = on_device_of(x, groups)
        x = x + self._pos_embed(x)
        coarse = None if groups is None else groups.shape[1:]
        for i, level in enumerate(self.layers[:stop]):
            res = (x.shape[1] // (2 if i else 1), x.shape[2] // (2 if i else 1))
            segments = partner_tokens = None
            if groups is not None:
                segments = upsample_mask(groups, res).to(torch.uint8)
                if partner_units is not None:
                    partner_tokens = partner_units * (res[0] // coarse[0]) * (res[1] // coarse[1])
            x = level(x, self.attention, segments, partner_tokens)
            yield x

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The position table, interpolated for inputs of another size (dense tasks)."""
        return interpolate_table(self.absolute_pos_embed, tuple(x.shape[1:3])).to(x.dtype)


# --------------------------------------------------------------------- timm registration


default_cfgs = default_cfgs_for(
    {
        "mixmae_swin_micro_w8": 64,
        "mixmae_swin_tiny_w14": 224,
        "mixmae_swin_base_w14": 224,
        "mixmae_swin_large_w14": 224,
        "mixmae_swin_huge_w14": 224,
        "mixmae_swin_base_w16_384": 384,
        "mixmae_swin_large_w16_384": 384,
    },
    first_conv="patch_embed.proj",
    crop_pct=0.875,
)

_W14 = (14, 14, 14, 7)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


@register_model
def mixmae_swin_micro_w8(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Tests and the CPU quickstart: 64-128 px, windows of 8."""
    args = dict(img_size=64, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(8, 8, 8, 8))
    return build_encoder(MixMAESwin, "mixmae_swin_micro_w8", pretrained, args, **kwargs)


@register_model
def mixmae_swin_tiny_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-T/W14 for single-GPU work."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=_W14)
    return build_encoder(MixMAESwin, "mixmae_swin_tiny_w14", pretrained, args, **kwargs)


@register_model
def mixmae_swin_base_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-B/W14, the paper's main model (88M parameters, 16.3 GFLOPs at 224)."""
    return build_encoder(MixMAESwin, "mixmae_swin_base_w14", pretrained, dict(**_B, window_size=_W14), **kwargs)


@register_model
def mixmae_swin_large_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-L/W14 (197M parameters, 35.9 GFLOPs at 224)."""
    return build_encoder(MixMAESwin, "mixmae_swin_large_w14", pretrained, dict(**_L, window_size=_W14), **kwargs)


@register_model
def mixmae_swin_huge_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-H/W14 (about 658M parameters; the paper's "600M")."""
    args = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=_W14)
    return build_encoder(MixMAESwin, "mixmae_swin_huge_w14", pretrained, args, **kwargs)


@register_model
def mixmae_swin_base_w16_384(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-B/W16 for 384-px fine-tuning (windows 16,16,24,12)."""
    args = dict(**_B, img_size=384, window_size=(16, 16, 24, 12))
    return build_encoder(MixMAESwin, "mixmae_swin_base_w16_384", pretrained, args, **kwargs)


@register_model
def mixmae_swin_large_w16_384(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-L/W16 for 384-px fine-tuning (windows 16,16,24,12)."""
    args = dict(**_L, img_size=384, window_size=(16, 16, 24, 12))
    return build_encoder(MixMAESwin, "mixmae_swin_large_w16_384", pretrained, args, **kwargs)
