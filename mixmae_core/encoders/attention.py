"""Segment-masked attention: what keeps every token of a mixed input inside its own image.

Every token carries a segment id: in pretraining its group (0: the row's own image,
1: its partner); padding slots get ``PAD_SEGMENT``. A query attends only to keys of its
own segment, so the features of one image never depend on another. Every encoder runs
its attention through this module.

Layouts. A level gathers its ``(B, H, W, C)`` token map into ``(S, n, C)`` sequences once,
runs all its blocks on them (norms and MLPs are per token, attention is per sequence) and
scatters back once:

* ``window_layout``: one sequence per window. Maps that windows do not tile (dense tasks
  at arbitrary sizes) get padding slots in the padding segment, which no token attends to.
* ``group_layout`` (the grouped fast path): when a window covers the whole map and every
  pair mixes the same number of units, each (row, group) becomes its own sequence of one
  image's tokens, so no attention work is spent on cross-image pairs at all. Relative
  positions are then looked up through ``positions``.

Implementations, selected by name, compute the same function:

* ``reference``: explicit logits, masked with -inf, softmax. The convention every other
  implementation is tested against.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the relative bias and
  the segment mask folded into one additive bias.
* ``flex``: FlexAttention: the bias is looked up inside the kernel and never materialised,
  and tiles with no same-segment pair are skipped. Built on first use: importing
  FlexAttention loads torch's inductor, seconds of start-up a Ray worker that never uses
  it should not pay.

An implementation has ``prepare(context)``, run once per level (its blocks share their
sequences), and ``attend(q, k, v, rel_bias, context, scale, dropout_p)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import gen_relative_position_index, trunc_normal_

from mixmae_core.masking import upsample_mask

PAD_SEGMENT = 2


# ----------------------------------------------------------------------------- layouts


@dataclass
class SequenceLayout:
    index: torch.Tensor
    """``(S, n)`` flat index ``b*H*W + y*W + x`` of the token in each slot (padding: any valid index)."""
    valid: Optional[torch.Tensor]
    """``(S, n)`` bool, False at padding slots; None when there is no padding."""
    positions: Optional[torch.Tensor]
    """``(S, n)`` position of each slot inside its window (for the relative bias); None: slot order."""
    segments: Optional[torch.Tensor]
    """``(S, n)`` uint8 segment ids; None when every slot of a sequence may attend to every other."""
    inverse: torch.Tensor
    """``(B*H*W,)`` flat slot of every token: scatters sequences back to the map."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(0, 2)[self.index]
        return seq if self.valid is None else seq * self.valid[..., None].to(seq.dtype)

    def scatter(self, seq: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return seq.flatten(0, 1)[self.inverse].view(shape)


def _inverse(index: torch.Tensor, valid: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    slots = torch.arange(index.numel(), device=index.device)
    flat = index.flatten()
    if valid is not None:
        # padding slots write to a spare entry: boolean indexing would stall on a device sync
        flat = torch.where(valid.flatten(), flat, num_tokens)
    inverse = torch.empty(num_tokens + 1, dtype=torch.long, device=index.device)
    inverse[flat] = slots
    return inverse[:num_tokens]


def window_layout(
    B: int, H: int, W: int, window: tuple[int, int], segments: Optional[torch.Tensor], device
) -> SequenceLayout:
    """One sequence per window; ``segments`` is the ``(B, H, W)`` uint8 map or None."""
    wh, ww = window
    pad_h, pad_w = -H % wh, -W % ww
    index = torch.arange(B * H * W, device=device).view(B, H, W)
    valid = None
    if pad_h or pad_w:
        index = F.pad(index, (0, pad_w, 0, pad_h), value=0)
        valid = F.pad(torch.ones(B, H, W, dtype=torch.bool, device=device), (0, pad_w, 0, pad_h), value=False)
        if segments is None:
            segments = torch.zeros(B, H, W, dtype=torch.uint8, device=device)
        segments = F.pad(segments, (0, pad_w, 0, pad_h), value=PAD_SEGMENT)
    Hp, Wp = H + pad_h, W + pad_w

    def windows(t: torch.Tensor) -> torch.Tensor:
        t = t.view(B, Hp // wh, wh, Wp // ww, ww).transpose(2, 3)
        return t.reshape(-1, wh * ww)

    index = windows(index)
    valid = None if valid is None else windows(valid)
    segments = None if segments is None else windows(segments)
    return SequenceLayout(index, valid, None, segments, _inverse(index, valid, B * H * W))


def group_layout(B: int, H: int, W: int, segments: torch.Tensor, partner_tokens: int) -> SequenceLayout:
    """Sequences of one (row, group) each, for a window that covers the whole map.

    ``segments`` is the ``(B, H, W)`` group map with exactly ``partner_tokens`` ones per row.
    The smaller group is padded to the size of the larger.
    """
    N = H * W
    n1 = partner_tokens
    n0 = N - n1
    n = max(n0, n1)
    flat = segments.reshape(B, N).long()
    # a stable order: own-image tokens in raster order, then partner tokens in raster order
    order = (flat * N + torch.arange(N, device=flat.device)).argsort(dim=1)
    slots = torch.arange(n, device=flat.device)
    pos0 = order[:, slots.clamp(max=n0 - 1)]
    pos1 = order[:, n0 + slots.clamp(max=n1 - 1)]
    positions = torch.stack([pos0, pos1], dim=1).view(2 * B, n)
    index = positions + (torch.arange(B, device=flat.device) * N).repeat_interleave(2)[:, None]
    valid = seg = None
    if n0 != n1:
        valid = torch.stack([slots < n0, slots < n1]).repeat(B, 1)
        seg = torch.where(valid, 0, PAD_SEGMENT).to(torch.uint8)
    return SequenceLayout(index, valid, positions, seg, _inverse(index, valid, B * N))


# ----------------------------------------------------------------------------- implementations


@dataclass
class AttentionContext:
    segments: Optional[torch.Tensor] = None
    """``(S, n)`` segment ids, or None when all slots of a sequence may attend each other."""
    positions: Optional[torch.Tensor] = None
    """``(S, n)`` window positions of the slots, or None when slot order is raster order."""
    key_segments: Optional[torch.Tensor] = None
    """``(S, m)`` segment ids of the keys when they are not the queries (sub-sampled keys)."""
    prepared: Any = None
    """What the implementation's ``prepare`` computed for this level."""


class AttentionImpl:
    name = "base"

    def prepare(self, context: AttentionContext) -> AttentionContext:
        allowed = None if context.segments is None else segment_mask(context.segments, context.key_segments)
        return replace(context, prepared=allowed)

    def attend(self, q, k, v, rel_bias, context: AttentionContext, scale: float, dropout_p: float = 0.0):
        """``rel_bias``: ``(h, N, N)`` relative position bias of a window, or None."""
        raise NotImplementedError


def segment_mask(segments: torch.Tensor, key_segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(S, n)`` query (and ``(S, m)`` key) segment ids -> ``(S, 1, n, m)`` bool, True where
    attention is allowed."""
    keys = segments if key_segments is None else key_segments
    return (segments[:, :, None] == keys[:, None, :]).unsqueeze(1)


def position_bias(rel_bias: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(h, N, N)`` window bias -> ``(1, h, n, n)``, or ``(S, h, n, n)`` for permuted slots."""
    if rel_bias is None or positions is None:
        return None if rel_bias is None else rel_bias.unsqueeze(0)
    return rel_bias[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)


class ReferenceAttention(AttentionImpl):
    name = "reference"

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        logits = (q * scale) @ k.transpose(-2, -1)
        bias = position_bias(rel_bias, context.positions)
        if bias is not None:
            logits = logits + bias
        if context.prepared is not None:
            logits = logits.masked_fill(~context.prepared, float("-inf"))
        probs = logits.softmax(dim=-1)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        return probs @ v


class SDPAAttention(AttentionImpl):
    name = "sdpa"

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        bias = position_bias(rel_bias, context.positions)
        if bias is None:
            bias = context.prepared  # a boolean mask (True: attend), or None
        else:
            bias = bias.to(q.dtype)
            if context.prepared is not None:
                bias = bias.masked_fill(~context.prepared, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


class FlexAttention(AttentionImpl):
    name = "flex"

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._block_mask, self._flex = create_block_mask, flex_attention
        self._compiled = torch.compile(flex_attention, dynamic=False)

    def prepare(self, context: AttentionContext) -> AttentionContext:
        segments = context.segments
        if segments is None:
            return replace(context, prepared=None)

        keys = segments if context.key_segments is None else context.key_segments

        def same_segment(b, h, q_idx, kv_idx):
            return segments[b, q_idx] == keys[b, kv_idx]

        (S, n), m = segments.shape, keys.shape[1]
        return replace(context, prepared=self._block_mask(same_segment, S, None, n, m, device=segments.device))

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        if dropout_p:
            raise ValueError("flex attention has no attention dropout: set attn_drop_rate=0 or use attn_impl='sdpa'")
        positions = context.positions
        if rel_bias is None:
            add_bias = None
        elif positions is None:

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + rel_bias[h, q_idx, kv_idx]

        else:

            def add_bias(score, b, h, q_idx, kv_idx):
                return score + rel_bias[h, positions[b, q_idx], positions[b, kv_idx]]

        # inside a compiled block dynamo lowers flex itself; eager GPU calls need the compiled
        # kernel (eager flex is the dense reference math, which is what CPU tests want)
        run = self._compiled if q.is_cuda and not torch.compiler.is_compiling() else self._flex
        return run(q, k, v, score_mod=add_bias, block_mask=context.prepared, scale=scale)


_FACTORIES: dict[str, Callable[[], AttentionImpl]] = {}
_IMPLS: dict[str, AttentionImpl] = {}


def register_attention(name: str, factory: Callable[[], AttentionImpl]) -> None:
    """Make ``factory()`` (called once, on first use) selectable as ``attn_impl=name``."""
    _FACTORIES[name] = factory
    _IMPLS.pop(name, None)


def get_attention(name: str) -> AttentionImpl:
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {available_attention()}")
    if name not in _IMPLS:
        _IMPLS[name] = _FACTORIES[name]()
    return _IMPLS[name]


def available_attention() -> list[str]:
    return sorted(_FACTORIES)


for _impl in (ReferenceAttention, SDPAAttention, FlexAttention):
    register_attention(_impl.name, _impl)


# ----------------------------------------------------------------------------- the module


class WindowAttention(nn.Module):
    """Multi-head attention over a level's ``(S, n, C)`` window (or group) sequences, with
    Swin's relative position bias over the ``window`` (``position_bias=False``: none, as
    Twins' locally-grouped attention), through a selectable implementation (above)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        position_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        if position_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
            )
            index = gen_relative_position_index(window).view(-1)
            self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if position_bias:
            trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> Optional[torch.Tensor]:
        if not hasattr(self, "relative_position_bias_table"):
            return None
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, impl, context: AttentionContext, rel_bias: Optional[torch.Tensor]) -> torch.Tensor:
        S, n, C = x.shape
        q, k, v = self.qkv(x).view(S, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        x = impl.attend(q, k, v, rel_bias, context, self.scale, dropout_p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(S, n, C)))


def windows_for(
    impl: AttentionImpl, x: torch.Tensor, window: tuple[int, int], groups: Optional[torch.Tensor]
) -> tuple[SequenceLayout, AttentionContext]:
    """The window layout of an NHWC map and its prepared context (windows larger than the
    map are clamped to it; ``groups``: coarse ``(B, h, w)`` bool or None)."""
    B, H, W, _ = x.shape
    window = (min(window[0], H), min(window[1], W))
    segments = None if groups is None else upsample_mask(groups, (H, W)).to(torch.uint8)
    layout = window_layout(B, H, W, window, segments, x.device)
    return layout, impl.prepare(AttentionContext(segments=layout.segments))


def reduction_context(impl: AttentionImpl, x: torch.Tensor, sr_ratio: int, groups: Optional[torch.Tensor]) -> AttentionContext:
    """The prepared context of :class:`SpatialReductionAttention` over an NHWC map: queries
    keep their tokens' groups, keys the groups of their cells."""
    if groups is None:
        return impl.prepare(AttentionContext())
    B, H, W, _ = x.shape
    queries = upsample_mask(groups, (H, W)).flatten(1).to(torch.uint8)
    keys = upsample_mask(groups, (H // sr_ratio, W // sr_ratio)).flatten(1).to(torch.uint8)
    return impl.prepare(AttentionContext(segments=queries, key_segments=keys))


def check_reduction_grid(level: int, token_stride: int, sr_ratio: int, unit: int = 32) -> None:
    """Refuse a key reduction whose cells straddle mask units.

    A sub-sampled key summarises ``sr x sr`` tokens of stride ``token_stride``: a cell of
    ``token_stride * sr`` pixels, laid from the image's corner. When that divides the 32-px
    unit, every cell lies inside one unit, so every key belongs to one image; otherwise a key
    would mix the two images of a mixed input.
    """
    cell = token_stride * sr_ratio
    if unit % cell:
        raise ValueError(
            f"stage {level + 1}: keys reduced over {sr_ratio}x{sr_ratio} tokens of stride {token_stride} cover "
            f"{cell}-px cells, which do not divide the {unit}-px mask units, so a key would mix two images; "
            f"choose sr_ratios[{level}] dividing {unit // token_stride}"
        )


class SpatialReductionAttention(nn.Module):
    """Attention of every token to keys sub-sampled by a strided convolution (Twins' global
    sub-sampled attention, PVTv2's spatial-reduction attention; timm's parameter names), with
    each query allowed only the keys of its own group (see :func:`check_reduction_grid`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x: torch.Tensor, impl, context: AttentionContext) -> torch.Tensor:
        """``x``: ``(B, H, W, C)``; ``context``: query segments ``(B, H*W)`` and key segments
        ``(B, H/sr * W/sr)`` (or none), prepared by ``impl``."""
        B, H, W, C = x.shape
        q = self.q(x).view(B, H * W, self.num_heads, -1).transpose(1, 2)
        keys = x
        if self.sr is not None:
            keys = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        k, v = self.kv(keys).view(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        out = impl.attend(q, k, v, None, context, self.scale, dropout_p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, H, W, C)))
