"""Mask R-CNN + FPN on the four encoder stages, assembled from torchvision's detection models.

Conventions (torchvision's): ``num_classes`` counts the background; in training the model
takes ``(images, targets)`` and returns the loss dict, in eval it returns per image
``{"boxes", "labels", "scores", "masks"}`` (masks ``(n, 1, H, W)`` probabilities).

Inputs are float images in [0, 1]; the model normalises them itself with the ImageNet
mean/std the encoder was pretrained with, so callers never normalise for detection.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mixmae_core.tasks.classification import EncoderAttention, EncoderWeights, create_encoder


class EncoderFPN(EncoderAttention, nn.Module):
    """Detection backbone: stage maps -> LayerNorm per level -> FPN (+ max-pool level).

    The encoder's stage maps are un-normalised residual streams whose scale grows with
    depth; like Swin's and ViTDet's detection backbones, each level gets its own LayerNorm
    before the FPN so the pyramid sees comparable inputs.
    Outputs ``"0"``..``"3"`` (strides 4..32) and ``"pool"`` (stride 64): the feature names
    torchvision's default anchor generator and RoI poolers expect.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256):
        super().__init__()
        channels = encoder.feature_info.channels()
        self.encoder = encoder
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in channels)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.encoder(x)
        return self.fpn(OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps))))


class MixMAEMaskRCNN(EncoderAttention, MaskRCNN):
    """torchvision's MaskRCNN whose attention kernel can be switched (see ``EncoderAttention``)."""


def build_mask_rcnn(
    encoder: str,
    num_classes: int,
    *,
    img_size: int,
    encoder_weights: EncoderWeights = None,
    encoder_overrides: Optional[dict[str, Any]] = None,
    drop_path_rate: float = 0.1,
    fpn_channels: int = 256,
    head_channels: int = 256,
    box_head_dim: int = 1024,
    **detector_kwargs: Any,
) -> MixMAEMaskRCNN:
    """Mask R-CNN (torchvision's standard heads) with an FPN over ``encoder``'s four stages.

    Images are resized so their longer side is ``img_size`` (a no-op for the square
    ``img_size`` inputs the pipeline feeds) and padded to a multiple of 32, the encoder
    stride. ``head_channels`` (mask head convolutions) and ``box_head_dim`` (box head MLP)
    default to torchvision's 256 and 1024; CPU-sized runs shrink them, since the mask head
    runs on every positive RoI and dominates the cost of small models. ``detector_kwargs``
    go to ``torchvision.models.detection.MaskRCNN`` (anchor generator, RPN/RoI sampling such
    as ``box_batch_size_per_image``, ``box_detections_per_img``...).

    For the FLOPs of the task model: ``forward_macs(model, torch.rand(1, 3, img_size, img_size))``
    (the model is in eval there, so RoI-head cost follows the proposals and detections of
    that input); ``forward_macs(model.backbone, ...)`` counts encoder + FPN alone.
    """
    trunk = create_encoder(
        encoder,
        img_size=img_size,
        encoder_weights=encoder_weights,
        drop_path_rate=drop_path_rate,
        features_only=True,
        **{"strict_windows": False, **(encoder_overrides or {})},
    )
    resolution = 7  # torchvision's box RoI pooling size
    return MixMAEMaskRCNN(
        EncoderFPN(trunk, fpn_channels),
        num_classes=None,  # given by the predictors
        box_head=TwoMLPHead(fpn_channels * resolution**2, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [head_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(head_channels, head_channels, num_classes),
        min_size=img_size,
        max_size=img_size,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        **detector_kwargs,
    )
