"""MAE (He et al., CVPR 2022): the baseline that cannot pretrain hierarchical encoders.

A forward pass (official code: facebookresearch/mae, models_mae.py):

1. Patch-embed a plain ViT's 16-px patches and add the fixed 2-D sin-cos position table.
2. Keep a random 25% of each image's patches (mask ratio 0.75, drawn by the data pipeline:
   ``mask_spec``); drop the rest.
3. Encode only the kept patches and a class token: the encoder never sees a mask, which is
   why MAE is cheap, and why it needs a plain ViT: a hierarchical encoder's windows and
   merges need the full grid of tokens.
4. Decode (8 ViT blocks, 512 wide) the kept tokens with mask tokens at the dropped places,
   and predict each patch's pixels.
5. Loss: mean squared error against per-patch normalised pixels (norm-pix), dropped patches only.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from mixmae_core.layers import init_weights, sincos_2d
from mixmae_core.masking import (
    MaskSpec, PretrainOutput, check_masks, norm_pix_target, patch_stats, patchify, unpatchify,
)


def with_class_row(table: torch.Tensor) -> torch.Tensor:
    """``(h, w, C)`` -> ``(1, 1 + h*w, C)`` with a zero row for the class token (MAE's layout)."""
    return torch.cat([torch.zeros(1, table.shape[-1]), table.flatten(0, 1)])[None]


def unsupported_vit_parts(encoder: nn.Module) -> list[str]:
    """What a timm ViT has that MAE's forward (patch embed + table, class token, blocks, norm)
    would skip or misplace: MAE would train such a ViT as another model than it is."""
    if not isinstance(encoder, VisionTransformer):
        return [f"it is a {type(encoder).__name__}, not a timm VisionTransformer"]
    found = []
    if encoder.cls_token is None:
        found.append("no class token (class_token=False)")
    if getattr(encoder, "num_reg_tokens", 0):
        found.append(f"{encoder.num_reg_tokens} register tokens (reg_tokens)")
    if getattr(encoder, "no_embed_class", False):
        found.append("a position table without the class token (no_embed_class=True)")
    if encoder.pos_embed is None:
        found.append("no position table (pos_embed='none')")
    if getattr(encoder, "dynamic_img_size", False):
        found.append("dynamic input sizes (dynamic_img_size=True)")
    if not isinstance(encoder.norm_pre, nn.Identity):
        found.append("a norm before the blocks (pre_norm=True)")
    return found


class MAE(nn.Module):
    """A timm ``VisionTransformer`` (class token, no head) + MAE's decoder and loss.

    ``forward(images, masks)``: ``masks`` ``(B, h, w)`` on the patch grid as ``mask_spec``
    draws them, the same number of dropped patches in every row; ``pred`` in the output is
    ``(B, L, patch*patch*3)``: predicted (normalised) pixels of every patch.
    """

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
        unsupported = unsupported_vit_parts(encoder)
        if unsupported:
            name = getattr(encoder, "pretrained_cfg", {}).get("architecture", type(encoder).__name__)
            raise ValueError(
                f"MAE computes a plain timm ViT as vit_base_patch16_224 is built: a class token, one position "
                f"table over the class token and the patches, the blocks, a final norm. {name} has "
                f"{'; '.join(unsupported)}, which MAE's forward does not compute: pick a plain ViT, or another method"
            )
        self.norm_pix_loss = norm_pix_loss
        self.encoder = encoder
        self.stride = encoder.patch_embed.patch_size[0]
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        self.mask_spec = MaskSpec(self.grid_size, mask_ratio, "random")
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

    def forward_encoder(self, images: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each row's kept patches (``dropped`` ``(B, L)`` bool, the same count per row)
        and the class token: (normed tokens ``(B, 1 + kept, C)``, the permutation that puts
        kept-then-dropped tokens back in raster order)."""
        encoder = self.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]  # (B, L, C)
        B, L, C = x.shape
        keep = L - int(dropped[0].sum())
        # kept positions first, each group in raster order: the blocks see a set of tokens, so
        # this encodes what MAE's shuffled order does
        order = dropped.to(torch.uint8).argsort(dim=1, stable=True)
        restore = order.argsort(dim=1).to(x.device, non_blocking=True)
        kept = order[:, :keep].to(x.device, non_blocking=True)
        x = torch.gather(x, 1, kept[..., None].expand(-1, -1, C))
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(B, -1, -1)
        x = encoder.blocks(torch.cat([cls, x], dim=1))
        return encoder.norm(x), restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        B, L = restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, x.shape[2]))  # back in raster order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        per_patch = (pred.float() - norm_pix_target(images, self.stride, self.norm_pix_loss)).pow(2).mean(dim=-1)
        return (per_patch * dropped).sum() / dropped.sum()

    @torch.no_grad()
    def panels(self, images: torch.Tensor, output: PretrainOutput) -> torch.Tensor:
        """``(B, 3, C, H, W)``: original, the kept patches, the reconstruction pasted around them."""
        images, pred = images.float(), output.pred.float()
        patches = patchify(images, self.stride)
        if self.norm_pix_loss:
            mean, std = patch_stats(patches)
            pred = pred * std + mean
        dropped = output.masks.flatten(1)[..., None]
        seen = unpatchify(torch.where(dropped, 0.0, patches), self.stride, self.grid_size)
        recon = unpatchify(torch.where(dropped, pred, patches), self.stride, self.grid_size)
        return torch.stack([images, seen, recon], dim=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> PretrainOutput:
        check_masks(masks, images, self.grid_size)
        counts = masks.flatten(1).sum(1)
        if not torch.equal(counts, counts[:1].expand_as(counts)):
            drops = sorted(set(counts.tolist()))
            raise ValueError(f"MAE encodes as many patches of every image: the masks drop {drops}")
        latent, restore = self.forward_encoder(images, masks.flatten(1))
        pred = self.forward_decoder(latent, restore)
        masks = masks.to(images.device, non_blocking=True)
        return PretrainOutput(loss=self.forward_loss(images, pred, masks.flatten(1)), pred=pred, masks=masks)


SMALL_DECODERS: dict[str, dict[str, int]] = {
    "mae_vit_micro_p8": dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
}
"""Decoders of the test-sized ViTs; every other ViT gets the paper's 512 x 8."""
OPTIONS = ("decoder_dim", "decoder_depth", "decoder_num_heads", "mask_ratio", "norm_pix_loss")
"""MAE's own keyword arguments; ``create_model`` passes the others to the ViT."""


def create_model(encoder: str, **kwargs: Any) -> MAE:
    """MAE on a timm plain ViT (``vit_base_patch16_224``, the paper's; ``mae_vit_micro_p8`` for
    tests); ``kwargs`` may name MAE's arguments (``OPTIONS``) or the ViT's."""
    method = {**dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16), **SMALL_DECODERS.get(encoder, {})}
    method.update({k: kwargs.pop(k) for k in OPTIONS if k in kwargs})
    if not timm.is_model(encoder):
        raise ValueError(f"unknown ViT {encoder!r}")
    return MAE(timm.create_model(encoder, num_classes=0, **kwargs), **method)
