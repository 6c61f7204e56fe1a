"""The MixMAE pretraining model: mixed encoder input, dual reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from mixmae_core.losses import reconstruction_loss, reconstruction_target
from mixmae_core.masking import (
    MaskMode,
    check_even_batch,
    normalize_mask,
    pair_rows,
    sample_mask,
    swap_pairs,
    validate_mask_ratio,
)
from mixmae_core.models.encoder import MixMAESwin, _init_weights
from mixmae_core.models.pos_embed import sincos_2d


@dataclass
class MixMAEOutput:
    loss: torch.Tensor
    """Scalar norm-pix MSE over every (image, coarse patch) target."""
    pred: torch.Tensor
    """``(B, L, stride*stride*3)``: per image, each position predicted by the copy in which it was hidden."""
    mask: torch.Tensor
    """``(B//2, h, w)`` bool: True where row 2k's mixed input shows row 2k+1's token."""


class MixMAEDecoder(nn.Module):
    """Unmix into two copies per mixed input, then a small ViT predicts pixels."""

    def __init__(
        self,
        in_dim: int,
        grid_size: tuple[int, int],
        patch: int,
        out_chans: int = 3,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(grid_size, dim).flatten(0, 1), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * out_chans)
        self.apply(_init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z: torch.Tensor, row_mask: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """``z``: ``(B, L, C)`` encoder tokens of the mixed inputs; ``row_mask``: ``(B, L)`` bool.

        Returns ``(B, L, patch*patch*C)``: image b's prediction at every position, taken
        from the copy in which that position of image b was hidden.
        """
        x = self.embed(z)
        token = self.mask_token.to(x.dtype).expand_as(x)
        m = row_mask[..., None]
        # copy "own" keeps the row's own tokens and predicts its image where m is set;
        # copy "partner" keeps the partner's tokens and predicts the partner where m is not.
        own, partner = torch.where(m, token, x), torch.where(m, x, token)
        pos = self.pos_embed
        if pos.shape[0] != x.shape[1]:
            pos = sincos_2d(grid_size, self.dim).flatten(0, 1).to(x.device)
        x = torch.cat([own, partner]) + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        own_rec, partner_rec = self.pred(self.norm(x)).chunk(2)
        return torch.where(m, own_rec, swap_pairs(partner_rec))


class MixMAE(nn.Module):
    """Encoder (``MixMAESwin``) + decoder + norm-pix loss.

    ``forward(images, mask=None)`` takes float images ``(B, 3, H, W)`` with partners in
    rows 2k/2k+1 and returns a ``MixMAEOutput``. Without ``mask`` one is drawn with
    ``mask_ratio`` (per pair, or per batch with ``mask_mode="batch"``).
    """

    def __init__(
        self,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.5,
        mask_mode: MaskMode = "pair",
        norm_pix_loss: bool = True,
        **encoder_kwargs,
    ):
        super().__init__()
        self.mask_ratio = validate_mask_ratio(mask_ratio)
        if mask_mode not in ("pair", "batch"):
            raise ValueError(f"mask_mode must be 'pair' or 'batch', got {mask_mode!r}")
        self.mask_mode = mask_mode
        self.norm_pix_loss = norm_pix_loss
        encoder_kwargs["num_classes"] = 0
        self.encoder = MixMAESwin(**encoder_kwargs)
        self.stride = self.encoder.stride
        self.grid_size = (self.encoder.img_size[0] // self.stride, self.encoder.img_size[1] // self.stride)
        self.decoder = MixMAEDecoder(
            self.encoder.num_features,
            self.grid_size,
            self.stride,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def set_attn_impl(self, name: str) -> None:
        self.encoder.set_attn_impl(name)

    def sample_mask(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        check_even_batch(batch_size)
        return sample_mask(
            batch_size // 2, self.grid_size, self.mask_ratio, mode=self.mask_mode, generator=generator, device=device
        )

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> MixMAEOutput:
        B, _, H, W = images.shape
        check_even_batch(B)
        grid = (H // self.stride, W // self.stride)
        # masks are drawn (and may be given) on the CPU: the encoder counts them there for free
        if mask is None:
            mask = sample_mask(B // 2, grid, self.mask_ratio, mode=self.mask_mode)
        else:
            mask = normalize_mask(mask, B // 2, grid)
        z = self.encoder.forward_features(images, mask)
        mask = mask.to(images.device, non_blocking=True)
        pred = self.decoder(z.flatten(1, 2), pair_rows(mask).flatten(1), grid)
        target = reconstruction_target(images, self.stride, self.norm_pix_loss)
        return MixMAEOutput(loss=reconstruction_loss(pred, target), pred=pred, mask=mask)
