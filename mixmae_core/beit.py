"""BEiT (Bao et al., ICLR 2022): masked image modelling on visual tokens, a plain-ViT baseline.

A forward pass (official code: microsoft/unilm, beit/):

1. Mask blocks of patches: about 40% of the 14x14 patches (75), in rectangles of at least
   16 patches (``masking.draw_blocks``, drawn by the data pipeline: ``mask_spec``).
2. Patch-embed the image; replace the masked patches' embeddings with one learned [MASK]
   embedding; prepend the class token. No absolute position table: one relative position
   bias shared by every block, and layer scale (timm's ``Beit``).
3. Encode every token, [MASK] included (as SimMIM, unlike MAE, and unlike fine-tuning).
4. Targets: a frozen tokenizer reads a second, smaller view of the same crop (BEiT: 112 px
   for 224, so that with its 8x downsampling it gives one visual token per 16-px patch) and
   assigns each patch one code of its codebook (``mixmae_core.tokenizer``). It runs in every
   step, so its forward counts in BEiT's training FLOPs.
5. Predict: the final norm, then a linear head over the codebook, at masked patches only.
6. Loss: cross-entropy against the tokenizer's codes at the masked patches.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.beit import Beit

from mixmae_core.masking import MaskSpec, PretrainOutput, check_masks, upsample_mask
from mixmae_core.tokenizer import build_tokenizer, images_from_tokenizer, load_tokenizer, tokenizer_input

#: BEiT's pretraining choices for any timm ``Beit`` variant, whose own defaults are the
#: fine-tuning ones (a bias table per block, mean pooling): a shared relative position bias,
#: no absolute table, drop path 0.1, and the final norm over every token (``token`` pooling
#: keeps it), which the prediction head reads. ``load_encoder_weights`` gives each block of a
#: fine-tuning model a copy of the shared table, as BEiT's fine-tuning does.
PRETRAIN_ENCODER = dict(
    use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, drop_path_rate=0.1, global_pool="token"
)


class BEiT(nn.Module):
    """A timm ``Beit`` + [MASK] embedding + linear head over a frozen tokenizer's codebook.

    ``forward(images, masks)``: ``masks`` ``(B, h, w)`` on the patch grid as ``mask_spec``
    draws them. In the output, ``pred`` is ``(M, vocab_size)``: the logits at the ``M`` masked
    patches, in the order of ``masks.nonzero()``; ``metrics["masked_token_acc"]`` the share of
    them whose argmax is the tokenizer's code.
    """

    def __init__(self, encoder: Beit, tokenizer: nn.Module, mask_ratio: float = 75 / 196):
        super().__init__()
        if not isinstance(encoder, Beit):
            raise ValueError(f"BEiT needs a timm Beit encoder; got {type(encoder).__name__}")
        self.encoder = encoder
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        self.mask_spec = MaskSpec(self.grid_size, mask_ratio, "blocks")
        self.tokenizer_size = tuple(n * tokenizer.downsample for n in self.grid_size)
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, tokenizer.vocab_size)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """BEiT's pretraining exemptions beyond 1-D parameters and biases: the class token and
        an absolute position table (the [MASK] embedding and bias tables decay)."""
        return {"encoder.cls_token", "encoder.pos_embed"}

    def forward_encoder(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Images and masks ``(B, h, w)`` -> final-normed patch tokens ``(B, L, C)``. timm's
        ``Beit.forward_features``, with the masked patches' embeddings replaced."""
        encoder = self.encoder
        x = encoder.patch_embed(images)  # (B, L, C)
        hidden = masks.flatten(1).to(x.device, non_blocking=True)[..., None]
        x = torch.where(hidden, self.mask_token.to(x.dtype), x)
        x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        x = encoder.pos_drop(x)
        bias = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
        for block in encoder.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        return encoder.norm(x)[:, 1:]

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer's code of every patch ``(B, L)``, from the smaller view of each image."""
        return self.tokenizer.codes(tokenizer_input(images, self.tokenizer_size)).flatten(1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> PretrainOutput:
        check_masks(masks, images, self.grid_size)
        # the masked (image, patch) slots, counted where the masks are (the CPU): no device sync
        where = masks.flatten().nonzero().squeeze(1).to(images.device, non_blocking=True)
        tokens = self.forward_encoder(images, masks)
        pred = self.lm_head(tokens.flatten(0, 1)[where])  # (M, vocab_size)
        target = self.targets(images).flatten()[where]
        loss = F.cross_entropy(pred.float(), target)
        accuracy = (pred.detach().argmax(dim=-1) == target).float().mean()
        masks = masks.to(images.device, non_blocking=True)
        return PretrainOutput(loss=loss, pred=pred, masks=masks, metrics={"masked_token_acc": accuracy})

    @torch.no_grad()
    def panels(self, images: torch.Tensor, output: PretrainOutput) -> torch.Tensor:
        """``(B, 3, C, H, W)``: original, what the encoder saw (masked patches blank), and the
        tokens decoded by a tokenizer that has a decoder (the dVAE): its own codes at the visible
        patches, BEiT's predictions at the masked ones. DALL-E's encoder has none: the third
        panel repeats the second."""
        images = images.float()
        seen = torch.where(upsample_mask(output.masks, tuple(images.shape[-2:]))[:, None], 0.0, images)
        if not hasattr(self.tokenizer, "decode"):
            return torch.stack([images, seen, seen], dim=1)
        codes = self.targets(images)
        codes[output.masks.flatten(1)] = output.pred.argmax(dim=-1)
        decoded = images_from_tokenizer(self.tokenizer.decode(codes.view(-1, *self.grid_size)))
        recon = F.interpolate(decoded, size=tuple(images.shape[-2:]), mode="bicubic", align_corners=False)
        return torch.stack([images, seen, recon], dim=1)


PAPER_TOKENIZER: dict[str, Any] = dict(kind="dalle")
SMALL_TOKENIZERS: dict[str, dict[str, Any]] = {
    "beit_micro_p8": dict(kind="dvae", vocab_size=512, hidden=64, codebook_dim=32, num_layers=1),
}
"""Tokenizers of the test-sized encoders: a 16-px view of a 64-px crop, one downsampling (BEiT
reads 112 of 224 through three; on the CPU stand-ins and a few dozen steps, a deeper dVAE's
codes fall to one or two, a shallow one keeps about five in use); every other encoder gets
DALL-E's encoder (8,192 codes), the paper's."""
OPTIONS = ("mask_ratio", "tokenizer")
"""BEiT's own keyword arguments; ``create_model`` passes the others to the encoder."""


def create_model(
    encoder: str,
    *,
    mask_ratio: float = 75 / 196,
    tokenizer: Optional[Union[str, os.PathLike, nn.Module]] = None,
    **kwargs: Any,
) -> BEiT:
    """BEiT on a timm ``Beit`` (``beit_base_patch16_224``, the paper's; ``beit_micro_p8`` for
    tests). ``tokenizer``: a file written by ``save_tokenizer`` or ``mixmae convert`` (a trained
    dVAE, DALL-E's converted encoder), or a module; None builds an untrained one of the
    encoder's default kind, which serves FLOP counts and tests, not pretraining. ``kwargs``
    go to the encoder, over ``PRETRAIN_ENCODER``."""
    if not timm.is_model(encoder):
        raise ValueError(f"unknown BEiT encoder {encoder!r}")
    if tokenizer is None:
        tokenizer = build_tokenizer(**{**PAPER_TOKENIZER, **SMALL_TOKENIZERS.get(encoder, {})})
    elif not isinstance(tokenizer, nn.Module):
        tokenizer = load_tokenizer(tokenizer)
    return BEiT(timm.create_model(encoder, num_classes=0, **{**PRETRAIN_ENCODER, **kwargs}), tokenizer, mask_ratio)
