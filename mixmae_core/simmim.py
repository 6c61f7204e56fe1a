"""SimMIM (Xie et al., CVPR 2022): the baseline MixMAE improves on, on the same encoders.

A forward pass (official code: microsoft/SimMIM):

1. Mask 32-px units of each image at random, ratio 0.6 (drawn by the data pipeline: ``mask_spec``).
2. Embed; replace the masked units' stem tokens with one learnable [MASK] token.
3. Encode every token, the [MASK] tokens included, all attending to each other: the compute
   MixMAE saves (it encodes no [MASK] token, and every token it encodes is a real one) and
   the inconsistency it avoids ([MASK] tokens never appear in fine-tuning).
4. Decode with one linear layer: a 1x1 convolution to ``stride * stride * 3`` values per
   last-level token, pixel-shuffled to the input size.
5. Loss: L1 against the input pixels (as normalised for the encoder), on masked pixels only.

Any encoder under MixMAE's contract serves (``mixmae_core/mixmae.py``); the groups it is given
are the mask itself, so a stem with overlapping kernels reads no masked pixel.
"""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from mixmae_core.masking import MaskSpec, PretrainOutput, check_masks, upsample_mask


class SimMIM(nn.Module):
    """An encoder under MixMAE's contract + [MASK] token + linear pixel decoder + masked L1.

    ``forward(images, masks)``: ``masks`` ``(B, h, w)`` as ``mask_spec`` draws them, one
    independent map of 32-px units per image; ``pred`` in the output is ``(B, 3, H, W)``
    predicted pixels (normalised), everywhere.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6):
        super().__init__()
        self.encoder = encoder
        self.stride = encoder.stride
        self.grid_size = (encoder.img_size[0] // self.stride, encoder.img_size[1] // self.stride)
        self.mask_spec = MaskSpec(self.grid_size, mask_ratio, "random")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.feature_info[0]["num_chs"]))
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * 3, kernel_size=1), nn.PixelShuffle(self.stride)
        )
        trunc_normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """SimMIM's own exemptions: its mask token and Swin's relative-position tables."""
        tables = {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return tables | {"mask_token"}

    def set_attn_impl(self, name: str) -> None:
        self.encoder.set_attn_impl(name)

    def forward_encoder(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Images and per-image masks ``(B, h, w)`` -> last map ``(B, h, w, C)``."""
        x = self.encoder.embed(images, masked)  # visible tokens read visible pixels only
        hidden = upsample_mask(masked.to(x.device, non_blocking=True), x.shape[1:3])[..., None]
        x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        z, _ = self.encoder.forward_tokens(x)  # no groups: [MASK] and real tokens attend to each other
        return z

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mean absolute error per masked pixel and channel (the official normalisation)."""
        pixels = upsample_mask(masked.to(images.device, non_blocking=True), tuple(images.shape[-2:]))[:, None]
        error = (images.float() - pred.float()).abs() * pixels
        return error.sum() / (pixels.sum() + 1e-5) / images.shape[1]

    @torch.no_grad()
    def panels(self, images: torch.Tensor, output: PretrainOutput) -> torch.Tensor:
        """``(B, 3, C, H, W)``: original, what the encoder saw (masked units blank), reconstruction."""
        pixels = upsample_mask(output.masks, tuple(images.shape[-2:]))[:, None]
        images = images.float()
        seen = torch.where(pixels, 0.0, images)
        return torch.stack([images, seen, torch.where(pixels, output.pred.float(), images)], dim=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> PretrainOutput:
        _, _, H, W = images.shape
        check_masks(masks, images, (H // self.stride, W // self.stride))
        pred = self.decoder(self.forward_encoder(images, masks).permute(0, 3, 1, 2))
        masks = masks.to(images.device, non_blocking=True)
        return PretrainOutput(loss=self.forward_loss(images, pred, masks), pred=pred, masks=masks)


OPTIONS = ("mask_ratio",)
"""SimMIM's own keyword arguments; ``create_model`` passes the others to the encoder."""


def create_model(encoder: str, mask_ratio: float = 0.6, **kwargs) -> SimMIM:
    """SimMIM on a registered encoder; ``kwargs`` go to the encoder."""
    if not timm.is_model(encoder):
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {timm.list_models('mixmae_*')}")
    return SimMIM(timm.create_model(encoder, num_classes=0, **kwargs), mask_ratio=mask_ratio)
