"""Attention over a stage's sequences, with segment masking and relative position bias.

Every token carries a segment id: in pretraining its group (0: the row's own image,
1: its partner); padding slots get ``PAD_SEGMENT``. A query attends only to keys of its
own segment, so the features of one image never depend on another.

Implementations are selected by name and compute the same function:

* ``reference``: explicit logits, masked with -inf, softmax. The convention every other
  implementation is tested against.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the relative bias
  and the segment mask folded into one additive bias.
* ``flex``: FlexAttention (``mixmae_core.flex``): the bias is looked up inside the kernel
  and never materialised, and tiles with no same-segment pair are skipped.

An implementation has ``prepare(context)``, run once per stage (all blocks of a stage
share their sequences), and ``attend(q, k, v, rel_bias, context, scale, dropout_p)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F

PAD_SEGMENT = 2


@dataclass
class AttentionContext:
    segments: Optional[torch.Tensor] = None
    """``(S, n)`` segment ids, or None when all slots of a sequence may attend each other."""
    positions: Optional[torch.Tensor] = None
    """``(S, n)`` window positions of the slots, or None when slot order is raster order."""
    prepared: Any = None
    """What the implementation's ``prepare`` computed for this stage."""


class AttentionImpl:
    name = "base"

    def prepare(self, context: AttentionContext) -> AttentionContext:
        allowed = None if context.segments is None else segment_mask(context.segments)
        return replace(context, prepared=allowed)

    def attend(self, q, k, v, rel_bias, context: AttentionContext, scale: float, dropout_p: float = 0.0):
        raise NotImplementedError


_IMPLS: dict[str, AttentionImpl] = {}


def register_attention(impl: AttentionImpl) -> AttentionImpl:
    _IMPLS[impl.name] = impl
    return impl


def get_attention(name: str) -> AttentionImpl:
    if name == "flex" and name not in _IMPLS:
        import mixmae_core.flex  # noqa: F401  (registers "flex"; loads torch's inductor)
    try:
        return _IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {available_attention()}") from None


def available_attention() -> list[str]:
    return sorted({*_IMPLS, "flex"})


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``(S, n)`` segment ids -> ``(S, 1, n, n)`` bool, True where attention is allowed."""
    return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)


def position_bias(rel_bias: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``(h, N, N)`` window bias -> ``(1, h, n, n)``, or ``(S, h, n, n)`` for permuted slots."""
    if positions is None:
        return rel_bias.unsqueeze(0)
    return rel_bias[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)


class ReferenceAttention(AttentionImpl):
    name = "reference"

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        logits = (q * scale) @ k.transpose(-2, -1) + position_bias(rel_bias, context.positions)
        if context.prepared is not None:
            logits = logits.masked_fill(~context.prepared, float("-inf"))
        probs = logits.softmax(dim=-1)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        return probs @ v


class SDPAAttention(AttentionImpl):
    name = "sdpa"

    def attend(self, q, k, v, rel_bias, context, scale, dropout_p=0.0):
        bias = position_bias(rel_bias, context.positions).to(q.dtype)
        if context.prepared is not None:
            bias = bias.masked_fill(~context.prepared, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


register_attention(ReferenceAttention())
register_attention(SDPAAttention())
