"""Window attention with per-token segment ids.

A segment id is given to every token of a window: in pretraining it is the token's
group (0: the row's own image, 1: its partner), and padding tokens (only in dense tasks
whose inputs are not multiples of the window) get ``PAD_SEGMENT``. A query attends only
to keys of its own segment, so the features of one image never depend on another.

Implementations are selected by name; all compute the same function:

* ``reference``: explicit logits, masked with -inf, softmax. Easy to read and the
  convention every other implementation is tested against.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the relative
  position bias and the segment mask folded into one additive bias.
* ``flex``: FlexAttention (see ``mixmae_core.fast``), which never materialises the
  bias and skips blocks of cross-image pairs; registered when that module is imported.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

PAD_SEGMENT = 2

AttentionFn = Callable[..., torch.Tensor]
_IMPLS: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def wrap(fn: AttentionFn) -> AttentionFn:
        _IMPLS[name] = fn
        return fn

    return wrap


def get_attention(name: str) -> AttentionFn:
    if name == "flex" and name not in _IMPLS:
        import mixmae_core.fast  # noqa: F401  (registers "flex")
    try:
        return _IMPLS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {sorted(available_attention())}") from None


def available_attention() -> list[str]:
    return sorted({*_IMPLS, "flex"})


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """``(B_, N)`` segment ids -> ``(B_, 1, N, N)`` bool, True where attention is allowed."""
    return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)


@register_attention("reference")
def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor,
    segments: Optional[torch.Tensor],
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    logits = (q * scale) @ k.transpose(-2, -1) + rel_bias
    if segments is not None:
        logits = logits.masked_fill(~segment_mask(segments), float("-inf"))
    probs = logits.softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


@register_attention("sdpa")
def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor,
    segments: Optional[torch.Tensor],
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    bias = rel_bias.to(q.dtype).unsqueeze(0)
    if segments is not None:
        bias = bias.masked_fill(~segment_mask(segments), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
