"""The MixMAE encoder: Swin without shifted windows, with segment-masked window attention.

One class serves pretraining (``forward_features(x, mask=...)`` mixes pairs and masks
attention per image), classification (``forward``), and dense heads
(``forward_intermediates`` / ``timm.create_model(..., features_only=True)``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, gen_relative_position_index, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch.utils.checkpoint import checkpoint

from mixmae_core.masking import mix_pairs, pair_rows, upsample_mask
from mixmae_core.models.attention import AttentionContext, AttentionImpl, get_attention
from mixmae_core.models.layout import SequenceLayout, group_layout, window_layout
from mixmae_core.models.pos_embed import sincos_2d


def stage_windows(
    img_size: tuple[int, int], patch_size: int, window_size: Sequence[int], strict: bool = True
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per stage ``(resolution, window)``; a window larger than its map is clamped to it.

    With ``strict`` raises a ValueError naming the stage when the image does not tile
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


class WindowAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        self.register_buffer("relative_position_index", gen_relative_position_index(window).view(-1), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, impl: AttentionImpl, context: AttentionContext, rel_bias: torch.Tensor
    ) -> torch.Tensor:
        S, n, C = x.shape
        q, k, v = self.qkv(x).view(S, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        x = impl.attend(q, k, v, rel_bias, context, self.scale, dropout_p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(S, n, C)))


class MixMAEBlock(nn.Module):
    """Pre-norm transformer block on a stage's window (or group) sequences ``(S, n, C)``."""

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

    def forward(
        self, x: torch.Tensor, impl: AttentionImpl, context: AttentionContext, rel_bias: torch.Tensor
    ) -> torch.Tensor:
        """``rel_bias``: this block's ``attn.relative_bias()``, passed in so that a compiled
        block sees it as an input (FlexAttention can then read it inside its kernel)."""
        x = x + self.drop_path1(self.attn(self.norm1(x), impl, context, rel_bias))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MixMAEStage(nn.Module):
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
            MixMAEBlock(dim, num_heads, window, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
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
        """``x``: ``(B, H, W, C)`` before downsampling; ``segments``: ``(B, H', W')`` uint8 at this
        stage's resolution or None; ``partner_tokens``: partner tokens per row if equal for all rows."""
        x = self.downsample(x)
        layout = self.layout(x, segments, partner_tokens)
        context = self._impl.prepare(AttentionContext(layout.segments, layout.positions))
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
        stages whose window covers the map as one sequence per (image, group).
        ``strict_windows=False`` (dense tasks) pads stage maps that windows do not tile, as
        Swin detection backbones do, instead of refusing the size."""
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        if kwargs:
            raise TypeError(f"unexpected arguments for MixMAESwin: {sorted(kwargs)}")
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if isinstance(window_size, int):
            window_size = (window_size,) * num_stages
        if len(window_size) != num_stages:
            raise ValueError(f"window_size {tuple(window_size)} needs one entry per stage ({num_stages})")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.stride = patch_size * 2 ** (num_stages - 1)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.window_size = tuple(window_size)
        geometry = stage_windows(self.img_size, patch_size, self.window_size, strict_windows)

        self.patch_embed = PatchEmbed(
            img_size=self.img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        self.register_buffer("absolute_pos_embed", sincos_2d(geometry[0][0], embed_dim), persistent=False)

        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            self.layers.append(
                MixMAEStage(
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
        self.apply(_init_weights)

    # ----------------------------------------------------------------- timm protocol
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [(r"^layers\.(\d+)\.downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_attn_impl(self, name: str) -> None:
        for stage in self.layers:
            stage.set_attn_impl(name)

    # ----------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        """Patch-embed, mix partners when a pair mask is given, add position embedding.

        Returns the tokens, the per-row coarse segment map (or None) and the number of
        partner units per row when it is the same for every pair (or None).
        """
        H, W = x.shape[-2:]
        if H % self.stride or W % self.stride:
            raise ValueError(f"input size {H}x{W} is not a multiple of the encoder stride {self.stride}")
        x = self.patch_embed(x)
        row_mask = partner_units = None
        if mask is not None:
            # counted where the mask lives: free for CPU masks, one sync for device masks
            counts = mask.flatten(1).sum(1)
            partner_units = int(counts[0]) if bool((counts == counts[0]).all()) else None
            row_mask = pair_rows(mask.to(x.device, non_blocking=True))
            x = mix_pairs(x, upsample_mask(row_mask, x.shape[1:3]))
        pos = self.absolute_pos_embed
        if tuple(pos.shape[:2]) != tuple(x.shape[1:3]):
            pos = sincos_2d(tuple(x.shape[1:3]), self.embed_dim).to(x.device)
        return x + pos.to(x.dtype), row_mask, partner_units

    def _stages(self, x, row_mask, partner_units, stop: Optional[int] = None):
        coarse = None if row_mask is None else row_mask.shape[1:]
        for i, stage in enumerate(self.layers[:stop]):
            res = (x.shape[1] // (2 if i else 1), x.shape[2] // (2 if i else 1))
            segments = partner_tokens = None
            if row_mask is not None:
                segments = upsample_mask(row_mask, res).to(torch.uint8)
                partner_tokens = None if partner_units is None else partner_units * (res[0] // coarse[0]) * (res[1] // coarse[1])
            x = stage(x, segments, partner_tokens)
            yield i, x

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> normed final map ``(B, h, w, C)``.

        With ``mask`` (bool ``(B//2, h, w)`` on the coarse grid, any device) rows 2k/2k+1
        are mixed and every attention is restricted to tokens of one image.
        """
        x, row_mask, partner_units = self._embed(x, mask)
        for _, x in self._stages(x, row_mask, partner_units):
            pass
        return self.norm(x)

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
        """Stage feature maps for dense heads (timm's intermediates protocol)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x, _, _ = self._embed(x, None)
        last = len(self.layers) - 1
        intermediates = []
        for i, x in self._stages(x, None, None, stop=max_index + 1 if stop_early else None):
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates


def _init_weights(module: nn.Module) -> None:
    # xavier for linears as in MAE/the official MixMAE code
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

