"""Plain ViTs for MAE. The paper's ViT-B/16 is timm's own ``vit_base_patch16_224``; this adds a
test-sized one for the CPU stand-ins, the same class with smaller dimensions."""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from mixmae_core.encoders.base import checkpoint_filter_fn, default_cfgs_for

default_cfgs = default_cfgs_for({"mae_vit_micro_p8": 64}, first_conv="patch_embed.proj", crop_pct=1.0)


@register_model
def mae_vit_micro_p8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tests and the CPU quickstart: 64 px in 8-px patches, 192 wide, 4 blocks (timm's VisionTransformer)."""
    args = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer, "mae_vit_micro_p8", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(args["depth"])), feature_cls="getter"), **{**args, **kwargs},
    )
