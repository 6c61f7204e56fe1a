"""How a stage's token map is laid out as attention sequences.

A stage gathers its ``(B, H, W, C)`` map into ``(S, n, C)`` sequences once, runs all its
blocks on them (norms and MLPs are per token, attention is per sequence), and scatters
back once. Two layouts:

* ``window_layout``: one sequence per window (Swin without shifts). Maps that do not
  tile into windows (dense tasks at arbitrary sizes) get padding slots, marked with the
  padding segment so no real token attends to them.
* ``group_layout``: when a window covers the whole map (stages 3-4 at 224) and every
  pair mixes the same number of units, each (row, group) becomes its own sequence:
  tokens of one image only, so attention spends no work on cross-image pairs at all.
  Relative positions are looked up through ``positions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mixmae_core.models.attention import PAD_SEGMENT


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
        index = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=0)
        valid = torch.nn.functional.pad(
            torch.ones(B, H, W, dtype=torch.bool, device=device), (0, pad_w, 0, pad_h), value=False
        )
        if segments is None:
            segments = torch.zeros(B, H, W, dtype=torch.uint8, device=device)
        segments = torch.nn.functional.pad(segments, (0, pad_w, 0, pad_h), value=PAD_SEGMENT)
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
