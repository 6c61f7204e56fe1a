"""MixMAE's Swin: Swin without shifted windows, every attention masked per image.

One class serves pretraining (``embed`` + ``forward_tokens(x, groups)``: the encoder
contract of ``mixmae_core/mixmae.py``), classification (``forward``) and dense heads
(``forward_intermediates`` / ``timm.create_model(..., features_only=True)``).

Every window attention runs through ``mixmae_core.encoders.attention`` with the groups as
segments; patch merging concatenates 2x2 tokens, which never straddle a 32-px mask unit
at stride 4-16, so nothing else moves information between images.

Variants (``@register_model`` below): micro (tests, the CPU quickstart), tiny, base, large
and huge with windows 14,14,14,7 at 224 (stages 3-4 global), base and large with windows
16,16,24,12 at 384 for fine-tuning.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch.utils.checkpoint import checkpoint

from mixmae_core.checkpoint import StateDict, adapt_to_encoder, encoder_state_dict
from mixmae_core.encoders.attention import (
    AttentionContext,
    SequenceLayout,
    WindowAttention,
    get_attention,
    group_layout,
    window_layout,
)
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
        attn_impl: str = "sdpa",
        split_groups: bool = False,
        **block_kwargs,
    ):
        super().__init__()
        self.window_size = window
        self.split_groups = split_groups
        self.grad_checkpointing = False
        self.set_attn_impl(attn_impl)
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)
        )

    def set_attn_impl(self, name: str) -> None:
        self.attn_impl = name
        self._impl = get_attention(name)

    def layout(self, x: torch.Tensor, segments: Optional[torch.Tensor], partner_tokens: Optional[int]) -> SequenceLayout:
        B, H, W, _ = x.shape
        covers_map = (H, W) == tuple(self.window_size)
        if self.split_groups and covers_map and segments is not None and partner_tokens and partner_tokens < H * W:
            return group_layout(B, H, W, segments, partner_tokens)
        return window_layout(B, H, W, self.window_size, segments, x.device)

    def forward(
        self, x: torch.Tensor, segments: Optional[torch.Tensor] = None, partner_tokens: Optional[int] = None
    ) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` before merging; ``segments``: ``(B, H', W')`` uint8 at this
        level's resolution or None; ``partner_tokens``: partner tokens per row if equal for all rows."""
        x = self.downsample(x)
        layout = self.layout(x, segments, partner_tokens)
        context = self._impl.prepare(AttentionContext(segments=layout.segments, positions=layout.positions))
        seq = layout.gather(x)
        for block in self.blocks:
            args = (seq, self._impl, context, block.attn.relative_bias())
            if self.grad_checkpointing and torch.is_grad_enabled():
                seq = checkpoint(block, *args, use_reentrant=False)
            else:
                seq = block(*args)
        return layout.scatter(seq, x.shape)


class MixMAESwin(nn.Module):
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
        super().__init__()
        unexpected = kwargs.keys() - {"pretrained_cfg", "pretrained_cfg_overlay"}  # timm passes these
        if unexpected:
            raise TypeError(f"unexpected arguments for MixMAESwin: {sorted(unexpected)}")
        num_levels = len(depths)
        if len(num_heads) != num_levels:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if isinstance(window_size, int):
            window_size = (window_size,) * num_levels
        if len(window_size) != num_levels:
            raise ValueError(f"window_size {tuple(window_size)} needs one entry per stage ({num_levels})")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.stride = patch_size * 2 ** (num_levels - 1)
        self.num_classes = num_classes
        self.global_pool = global_pool
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
        self._register_load_state_dict_pre_hook(self._keep_own_table)

        dims = [embed_dim * 2**i for i in range(num_levels)]
        self.num_features = self.head_hidden_size = dims[-1]
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
                    attn_impl=attn_impl,
                    split_groups=split_groups,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def _keep_own_table(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the table was saved load with the table drawn here."""
        state_dict.setdefault(prefix + "absolute_pos_embed", self.absolute_pos_embed)

    # ----------------------------------------------------------------- timm protocol
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond the 1-D parameters: MixMAE's fine-tuning decays the relative-position tables."""
        return set()

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

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.layers:
            level.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_attn_impl(self, name: str) -> None:
        for level in self.layers:
            level.set_attn_impl(name)

    def set_split_groups(self, enable: bool) -> None:
        for level in self.layers:
            level.split_groups = enable

    # ----------------------------------------------------------------- the encoder contract
    def embed(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> stem tokens ``(B, H/4, W/4, C)``. A token reads one 4x4
        patch, inside one 32-px unit, so it never reads another group's pixels anyway."""
        H, W = x.shape[-2:]
        if H % self.stride or W % self.stride:
            raise ValueError(f"input size {H}x{W} is not a multiple of the encoder stride {self.stride}")
        return self.patch_embed(x)

    def forward_tokens(
        self, x: torch.Tensor, groups: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem tokens (here possibly mixed) -> (final-normed last map, per-level maps), NHWC.

        ``groups``: bool ``(B, h, w)`` on the stride-32 grid (any device), or None. With it,
        every window attention is restricted to tokens of one group.
        """
        partner_units = None
        if groups is not None:
            # counted where the groups live: free for CPU masks, one sync for device masks
            counts = groups.flatten(1).sum(1)
            partner_units = int(counts[0]) if bool((counts == counts[0]).all()) else None
            groups = groups.to(x.device, non_blocking=True)
        features = list(self._levels(x + self._pos_embed(x), groups, partner_units))
        return self.norm(features[-1]), features

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The position table, interpolated for inputs of another size (dense tasks)."""
        return interpolate_table(self.absolute_pos_embed, tuple(x.shape[1:3])).to(x.dtype)

    def _levels(self, x, groups, partner_units, stop: Optional[int] = None):
        coarse = None if groups is None else groups.shape[1:]
        for i, level in enumerate(self.layers[:stop]):
            res = (x.shape[1] // (2 if i else 1), x.shape[2] // (2 if i else 1))
            segments = partner_tokens = None
            if groups is not None:
                segments = upsample_mask(groups, res).to(torch.uint8)
                if partner_units is not None:
                    partner_tokens = partner_units * (res[0] // coarse[0]) * (res[1] // coarse[1])
            x = level(x, segments, partner_tokens)
            yield x

    # ----------------------------------------------------------------- classification and dense heads
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> normed final map ``(B, h, w, C)``."""
        return self.forward_tokens(self.embed(x))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Level feature maps for dense heads (timm's intermediates protocol)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x = self.embed(x)
        x = x + self._pos_embed(x)
        last = len(self.layers) - 1
        intermediates = []
        for i, x in enumerate(self._levels(x, None, None, stop=max_index + 1 if stop_early else None)):
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates


# --------------------------------------------------------------------- timm registration


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MixMAESwin) -> StateDict:
    """timm's ``pretrained_filter_fn``: any checkpoint layout ``load_encoder_weights`` reads
    (pretraining, classifier, official), fitted to ``model``'s windows and head. Given
    through ``pretrained_cfg_overlay=dict(file=PATH)``: the configs below carry no URL or
    hub id, so timm never fetches weights for these variants."""
    return adapt_to_encoder(encoder_state_dict(state_dict), model)


def _cfg(img_size: int = 224) -> dict[str, Any]:
    return dict(
        url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None,
        crop_pct=0.875 if img_size == 224 else 1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
    )


default_cfgs = generate_default_cfgs(
    {
        "mixmae_swin_micro_w8": _cfg(64),
        "mixmae_swin_tiny_w14": _cfg(),
        "mixmae_swin_base_w14": _cfg(),
        "mixmae_swin_large_w14": _cfg(),
        "mixmae_swin_huge_w14": _cfg(),
        "mixmae_swin_base_w16_384": _cfg(384),
        "mixmae_swin_large_w16_384": _cfg(384),
    }
)

_W14 = (14, 14, 14, 7)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


def _create(name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> MixMAESwin:
    kwargs = {**model_args, **kwargs}
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        MixMAESwin,
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


@register_model
def mixmae_swin_micro_w8(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Tests and the CPU quickstart: 64-128 px, windows of 8."""
    args = dict(img_size=64, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(8, 8, 8, 8))
    return _create("mixmae_swin_micro_w8", pretrained, args, **kwargs)


@register_model
def mixmae_swin_tiny_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-T/W14 for single-GPU work."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=_W14)
    return _create("mixmae_swin_tiny_w14", pretrained, args, **kwargs)


@register_model
def mixmae_swin_base_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-B/W14, the paper's main model (88M parameters, 16.3 GFLOPs at 224)."""
    return _create("mixmae_swin_base_w14", pretrained, dict(**_B, window_size=_W14), **kwargs)


@register_model
def mixmae_swin_large_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-L/W14 (197M parameters, 35.9 GFLOPs at 224)."""
    return _create("mixmae_swin_large_w14", pretrained, dict(**_L, window_size=_W14), **kwargs)


@register_model
def mixmae_swin_huge_w14(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-H/W14 (about 658M parameters; the paper's "600M")."""
    args = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=_W14)
    return _create("mixmae_swin_huge_w14", pretrained, args, **kwargs)


@register_model
def mixmae_swin_base_w16_384(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-B/W16 for 384-px fine-tuning (windows 16,16,24,12)."""
    args = dict(**_B, img_size=384, window_size=(16, 16, 24, 12))
    return _create("mixmae_swin_base_w16_384", pretrained, args, **kwargs)


@register_model
def mixmae_swin_large_w16_384(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    """Swin-L/W16 for 384-px fine-tuning (windows 16,16,24,12)."""
    args = dict(**_L, img_size=384, window_size=(16, 16, 24, 12))
    return _create("mixmae_swin_large_w16_384", pretrained, args, **kwargs)
