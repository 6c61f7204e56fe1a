"""MixMAE: Mixed and Masked Autoencoder (Lin et al., CVPR 2023), the whole method.

A forward pass, in the order the paper tells it (official code: Sense-X/MixMIM):

1. A mask on the encoder's stride-32 grid (7x7 at 224): ``floor(h*w*r)`` units per pair,
   r = 0.5, drawn by the data pipeline (``mask_spec``: the same map for both rows of the
   pair). Rows 2k and 2k+1 of a batch are partners.
2. Mix: patch-embed every image on its own, then row 2k shows row 2k+1's tokens where the
   mask is set and row 2k+1 shows row 2k's there, so each pair gives two complementary mixed
   inputs and every patch of both images is visible exactly once.
3. Encode the mixed inputs with the mask as groups: everything that moves information
   between tokens stays inside one image, so an image's features never depend on its partner.
4. Unmix: two copies of each mixed input's last map, one keeping the row's own tokens and
   one keeping its partner's, the other positions filled with one learnable mask token.
5. Decode (8 ViT blocks, 512 wide) and predict 32x32x3 pixels per position; each image's
   prediction at a position comes from the copy in which that position was hidden.
6. Loss: mean squared error against per-patch normalised pixels (norm-pix), one term per
   (image, patch).

The encoder contract. MixMAE pretrains any hierarchical encoder that offers

* ``stride`` (input pixels per last-level token: the 32-px mask unit), ``img_size`` and
  ``num_features`` (channels of the last level);
* ``embed(images, groups=None) -> (B, H, W, C)``: stem tokens, each image on its own; with
  ``groups`` (below) a token reads only pixels of units in its own group (a stem whose
  kernels overlap would otherwise read the pixels the mixed input hides);
* ``forward_tokens(x, groups=None) -> (last, features)``: ``x`` the (mixed) stem tokens,
  ``groups`` bool ``(B, h, w)`` on the stride grid (any device); with groups, attention,
  sub-sampled keys and convolutions between tokens never cross groups. ``last`` is the
  final-normed last map ``(B, h, w, C')``, ``features`` the per-level maps (NHWC).

``mixmae_core.encoders`` holds encoders that keep it, one file per family; the isolation
test (an image's output does not change when its partner changes) is the proof.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from mixmae_core.layers import init_weights, sincos_2d
from mixmae_core.masking import (
    MaskMode,
    MaskSpec,
    PretrainOutput,
    check_masks,
    mix_images,
    mix_pairs,
    norm_pix_target,
    patch_stats,
    patchify,
    swap_pairs,
    unpatchify,
    upsample_mask,
)


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
        self.apply(init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z: torch.Tensor, groups: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """``z``: ``(B, L, C)`` encoder tokens of the mixed inputs; ``groups``: ``(B, L)`` bool.

        Returns ``(B, L, patch*patch*C)``: image b's prediction at every position, taken
        from the copy in which that position of image b was hidden.
        """
        x = self.embed(z)
        token = self.mask_token.to(x.dtype).expand_as(x)
        m = groups[..., None]
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
    """An encoder under the contract above + the unmixing decoder + the norm-pix loss.

    ``forward(images, masks)`` takes float images ``(B, 3, H, W)`` with partners in rows
    2k/2k+1 and their masks ``(B, h, w)`` as ``mask_spec`` draws them (both rows of a pair
    carry the pair's map), and returns a ``PretrainOutput`` whose ``pred`` is
    ``(B, L, stride*stride*3)``: per image, each position predicted by the copy in which it
    was hidden. With ``mask_mode="batch"`` every pair takes the first pair's map (the
    official code's one mask per step).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.5,
        mask_mode: MaskMode = "pair",
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if mask_mode not in ("pair", "batch"):
            raise ValueError(f"mask_mode must be 'pair' or 'batch', got {mask_mode!r}")
        self.mask_mode = mask_mode
        self.norm_pix_loss = norm_pix_loss
        self.encoder = encoder
        self.stride = encoder.stride
        self.grid_size = (encoder.img_size[0] // self.stride, encoder.img_size[1] // self.stride)
        self.mask_spec = MaskSpec(self.grid_size, mask_ratio, "shared")
        self.decoder = MixMAEDecoder(
            encoder.num_features, self.grid_size, self.stride, dim=decoder_dim, depth=decoder_depth,
            num_heads=decoder_num_heads,
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond 1-D parameters and biases: the official pretraining decays the
        relative-position tables and the mask token."""
        return set()

    def set_attn_impl(self, name: str) -> None:
        self.encoder.set_attn_impl(name)

    def forward_encoder(self, images: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mix partners by ``groups`` ``(B, h, w)`` and encode per image -> ``(B, h, w, C)``."""
        x = self.encoder.embed(images, groups)  # (B, H, W, C): each image's own tokens
        x = mix_pairs(x, upsample_mask(groups.to(x.device, non_blocking=True), x.shape[1:3]))
        z, _ = self.encoder.forward_tokens(x, groups)
        return z

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every value: each (image, patch) appears once in ``pred``."""
        target = norm_pix_target(images, self.stride, self.norm_pix_loss)
        return (pred.float() - target).pow(2).mean()

    @torch.no_grad()
    def panels(self, images: torch.Tensor, output: PretrainOutput) -> torch.Tensor:
        """``(B, 3, C, H, W)``: per image its original, its mixed input and its reconstruction
        (norm-pix predictions mapped back with each target patch's own mean and std)."""
        images, pred = images.float(), output.pred.float()
        B, C, H, W = images.shape
        if self.norm_pix_loss:
            mean, std = patch_stats(patchify(images, self.stride))
            pred = pred * std + mean
        recon = unpatchify(pred, self.stride, (H // self.stride, W // self.stride), C)
        return torch.stack([images, mix_images(images, output.masks), recon], dim=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> PretrainOutput:
        _, _, H, W = images.shape
        grid = (H // self.stride, W // self.stride)
        check_masks(masks, images, grid)
        if self.mask_mode == "batch":
            masks = masks[:1].expand_as(masks)
        elif not torch.equal(masks[0::2], masks[1::2]):
            raise ValueError("MixMAE's rows 2k and 2k+1 take one map (the pair's groups); their masks differ")
        # masks stay on the CPU (as the pipeline delivers them): the encoder counts them there for free
        z = self.forward_encoder(images, masks)
        groups = masks.to(images.device, non_blocking=True)  # True where a row shows its partner's token
        pred = self.decoder(z.flatten(1, 2), groups.flatten(1), grid)
        return PretrainOutput(loss=self.forward_loss(images, pred), pred=pred, masks=groups)


PAPER_DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)
SMALL_DECODERS: dict[str, dict[str, int]] = {
    name: dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4)
    for name in ("mixmae_swin_micro_w8", "mixmae_twins_svt_micro", "mixmae_pvt_v2_micro")
}
"""Decoders of the test-sized encoders; every other encoder gets the paper's 512 x 8."""
OPTIONS = ("decoder_dim", "decoder_depth", "decoder_num_heads", "mask_ratio", "mask_mode", "norm_pix_loss")
"""MixMAE's own keyword arguments; ``create_model`` passes the others to the encoder."""


def create_model(encoder: str, **kwargs: Any) -> MixMAE:
    """The pretraining model on a registered encoder (``mixmae_swin_base_w14``, ...).

    ``kwargs`` may name MixMAE's arguments (``OPTIONS``) or the encoder's (``img_size``,
    ``attn_impl``, ...); the decoder defaults to the paper's.
    """
    method = {**PAPER_DECODER, **SMALL_DECODERS.get(encoder, {})}
    method.update({k: kwargs.pop(k) for k in OPTIONS if k in kwargs})
    if not timm.is_model(encoder):
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {timm.list_models('mixmae_*')}")
    return MixMAE(timm.create_model(encoder, num_classes=0, **kwargs), **method)
