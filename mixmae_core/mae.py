"""MAE (He et al., CVPR 2022): the baseline that cannot pretrain hierarchical encoders.

A forward pass (official code: facebookresearch/mae, models_mae.py):

1. Patch-embed a plain ViT's 16-px patches and add the fixed 2-D sin-cos position table.
2. Keep a random 25% of each image's patches (mask ratio 0.75); drop the rest.
3. Encode only the kept patches and a class token: the encoder never sees a mask, which is
   why MAE is cheap, and why it needs a plain ViT: a hierarchical encoder's windows and
   merges need the full grid of tokens.
4. Decode (8 ViT blocks, 512 wide) the kept tokens with mask tokens at the dropped places,
   and predict each patch's pixels.
5. Loss: mean squared error against per-patch normalised pixels (norm-pix), dropped patches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from mixmae_core.layers import init_weights, sincos_2d
from mixmae_core.masking import norm_pix_target, patch_stats, patchify, unpatchify, validate_mask_ratio


@dataclass
class MAEOutput:
    loss: torch.Tensor
    """Scalar norm-pix MSE over the dropped patches."""
    pred: torch.Tensor
    """``(B, L, patch*patch*3)`` predicted (normalised) pixels of every patch."""
    mask: torch.Tensor
    """``(B, L)`` bool: True where a patch was dropped."""


def with_class_row(table: torch.Tensor) -> torch.Tensor:
    """``(h, w, C)`` -> ``(1, 1 + h*w, C)`` with a zero row for the class token (MAE's layout)."""
    return torch.cat([torch.zeros(1, table.shape[-1]), table.flatten(0, 1)])[None]


class MAE(nn.Module):
    """A timm ``VisionTransformer`` (class token, no head) + MAE's decoder and loss."""

    uses_pair_masks = False  # MAE drops 16-px patches of each image at random itself

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None:
            raise ValueError(f"MAE needs a plain ViT with a class token; got {type(encoder).__name__}")
        self.mask_ratio = validate_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.encoder = encoder
        self.stride = encoder.patch_embed.patch_size[0]
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        dim = encoder.embed_dim
        # MAE's initialisation and fixed position table for the encoder
        encoder.apply(init_weights)
        nn.init.xavier_uniform_(encoder.patch_embed.proj.weight.view(dim, -1))
        nn.init.normal_(encoder.cls_token, std=0.02)
        encoder.pos_embed.requires_grad_(False).copy_(with_class_row(sincos_2d(self.grid_size, dim)))

        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", with_class_row(sincos_2d(self.grid_size, decoder_dim)), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.stride**2 * 3)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases, as MAE's pretraining (class and mask tokens decay)."""
        return set()

    def random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each row's tokens: (kept tokens, mask ``(B, L)``
        True where dropped, the permutation that puts tokens back in order)."""
        B, L, C = x.shape
        keep = int(L * (1 - self.mask_ratio))
        shuffle = torch.rand(B, L, device=x.device).argsort(dim=1)  # ascending noise: the first are kept
        restore = shuffle.argsort(dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, C))
        mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        mask[:, :keep] = False
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]  # (B, L, C)
        x, mask, restore = self.random_masking(x)
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = encoder.blocks(torch.cat([cls, x], dim=1))
        return encoder.norm(x), mask, restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        B, L = restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, x.shape[2]))  # back in raster order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = (pred.float() - norm_pix_target(images, self.stride, self.norm_pix_loss)).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @torch.no_grad()
    def panels(self, images: torch.Tensor, output: MAEOutput) -> torch.Tensor:
        """``(B, 3, C, H, W)``: original, the kept patches, the reconstruction pasted around them."""
        images, pred = images.float(), output.pred.float()
        patches = patchify(images, self.stride)
        if self.norm_pix_loss:
            mean, std = patch_stats(patches)
            pred = pred * std + mean
        dropped = output.mask[..., None].to(images.device)
        seen = unpatchify(torch.where(dropped, 0.0, patches), self.stride, self.grid_size)
        recon = unpatchify(torch.where(dropped, pred, patches), self.stride, self.grid_size)
        return torch.stack([images, seen, recon], dim=1)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> MAEOutput:
        """``mask`` is not taken: MAE draws its own (``random_masking``, torch's generator)."""
        if mask is not None:
            raise ValueError("MAE draws its own patch masks; do not pass the pipeline's pair masks")
        latent, dropped, restore = self.forward_encoder(images)
        pred = self.forward_decoder(latent, restore)
        return MAEOutput(loss=self.forward_loss(images, pred, dropped), pred=pred, mask=dropped)


SMALL_DECODERS: dict[str, dict[str, int]] = {
    "mae_vit_micro_p8": dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
}
"""Decoders of the test-sized ViTs; every other ViT gets the paper's 512 x 8."""
METHOD_ARGS = ("decoder_dim", "decoder_depth", "decoder_num_heads", "mask_ratio", "norm_pix_loss")


def create_model(encoder: str, **kwargs: Any) -> MAE:
    """MAE on a timm plain ViT (``vit_base_patch16_224``, the paper's; ``mae_vit_micro_p8`` for
    tests); ``kwargs`` may name MAE's arguments (``METHOD_ARGS``) or the ViT's."""
    method = {**dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16), **SMALL_DECODERS.get(encoder, {})}
    method.update({k: kwargs.pop(k) for k in METHOD_ARGS if k in kwargs})
    if not timm.is_model(encoder):
        raise ValueError(f"unknown ViT {encoder!r}")
    return MAE(timm.create_model(encoder, num_classes=0, **kwargs), **method)
