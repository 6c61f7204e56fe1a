"""Plain ViTs for MAE. The paper's ViT-B/16 is timm's own ``vit_base_patch16_224``; this adds a
test-sized one for the CPU stand-ins, the same class with smaller dimensions."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from mixmae_core.checkpoint import StateDict, adapt_to_encoder, encoder_state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: VisionTransformer) -> StateDict:
    """timm's ``pretrained_filter_fn``: an MAE pretraining or classifier checkpoint (local files only)."""
    return adapt_to_encoder(encoder_state_dict(state_dict), model)


default_cfgs = generate_default_cfgs(
    {
        "mae_vit_micro_p8": dict(
            url="", num_classes=1000, input_size=(3, 64, 64), pool_size=None, crop_pct=1.0, interpolation="bicubic",
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
            license="apache-2.0",
        )
    }
)


@register_model
def mae_vit_micro_p8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tests and the CPU quickstart: 64 px in 8-px patches, 192 wide, 4 blocks (timm's VisionTransformer)."""
    args = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer, "mae_vit_micro_p8", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(args["depth"])), feature_cls="getter"), **{**args, **kwargs},
    )
