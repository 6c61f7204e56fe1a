"""UperNet on the four encoder stages (segmentation_models_pytorch's UPerNet).

smp reaches our encoder through timm (``tu-<name>``); its decoder already puts a LayerNorm
on every stage map, so the encoder's un-normalised stage maps need nothing more.
Inputs are images normalised with the ImageNet mean/std, with sides a multiple of 32;
the output is per-class logits at input resolution.
"""

from __future__ import annotations

from typing import Any, Optional

import segmentation_models_pytorch as smp
import torch.nn as nn

from mixmae_core.tasks.classification import EncoderAttention, EncoderWeights, prepare_dense_trunk


class MixMAEUPerNet(EncoderAttention, smp.UPerNet):
    """smp's UPerNet whose attention kernel can be switched (see ``EncoderAttention``)."""


def build_upernet(
    encoder: str,
    num_classes: int = 150,
    *,
    img_size: int,
    encoder_weights: EncoderWeights = None,
    encoder_overrides: Optional[dict[str, Any]] = None,
    drop_path_rate: float = 0.1,
    decoder_channels: int = 512,
) -> MixMAEUPerNet:
    """UperNet (PPM + FPN fusion, BatchNorm in the decoder) with logits ``(B, num_classes, H, W)``.

    ``decoder_channels`` 512 is UperNet's width in the Swin/MixMAE ADE20K recipes. The
    decoder uses BatchNorm; under DDP convert it with ``nn.SyncBatchNorm.convert_sync_batchnorm``
    (its pyramid-pooling branch needs more than one image per batch in training).
    FLOPs: ``forward_macs(model, torch.randn(1, 3, img_size, img_size))``.
    """
    model = MixMAEUPerNet(
        encoder_name=f"tu-{encoder}",
        encoder_weights=None,
        classes=num_classes,
        decoder_channels=decoder_channels,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        num_classes=0,
        **{"strict_windows": False, **(encoder_overrides or {})},
    )
    prepare_dense_trunk(dense_trunk(model), encoder_weights)
    return model


def dense_trunk(model: smp.UPerNet) -> nn.Module:
    """The encoder inside an smp model (smp's timm wrapper holds timm's feature getter)."""
    return model.encoder.model.model
