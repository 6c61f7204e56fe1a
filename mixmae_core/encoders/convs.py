"""Convolutions between tokens kept inside their group (PVTv2's overlapping patch embeddings
and MLP depthwise convolution, Twins' positional-encoding convolution).

A 3x3 or 7x7 kernel at a unit's border would read the partner image's tokens (or, on the
stem, pixels of the image that its mixed input hides). :func:`per_group` runs the
convolution once per group, on that group's inputs with the other group's zeroed, and
every output position keeps the result of its own group: so each image's tokens see their
own image only, as if the other group's positions were padding. It costs a second pass of
the convolution (its FLOPs double; ``mixmae flops`` counts them as they run), only where
groups are given, i.e. in MixMAE and SimMIM pretraining, never in transfer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mixmae_core.masking import upsample_mask


def per_group(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
    """``op`` over NCHW ``x`` with no output reading another group's inputs.

    ``groups``: bool ``(B, h, w)`` on the stride-32 grid (None: ``op(x)``); both ``x`` and
    ``op``'s output must have sides that are multiples of the grid's.
    """
    # NCHW-contiguous: on a channels-last view (a permuted NHWC map) a depthwise convolution
    # returns its weight gradient in another layout, which DDP would copy at every step
    x = x.contiguous()
    if groups is None:
        return op(x)
    inside = upsample_mask(groups, tuple(x.shape[-2:]))[:, None]
    own, partner = op(torch.where(inside, 0.0, x)), op(torch.where(inside, x, 0.0))
    return torch.where(upsample_mask(groups, tuple(own.shape[-2:]))[:, None], partner, own)
