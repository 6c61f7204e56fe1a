"""Plain ViTs for MAE and BEiT. The papers' ViT-B/16s are timm's own ``vit_base_patch16_224`` and
``beit_base_patch16_224``; this adds test-sized ones for the CPU stand-ins, the same classes
with smaller dimensions."""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, register_model
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from mixmae_core.encoders.base import checkpoint_filter_fn, default_cfgs_for

default_cfgs = default_cfgs_for({"mae_vit_micro_p8": 64, "beit_micro_p8": 64}, first_conv="patch_embed.proj", crop_pct=1.0)
_MICRO_SIZE = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3)


@register_model
def mae_vit_micro_p8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Tests and the CPU quickstart: 64 px in 8-px patches, 192 wide, 4 blocks (timm's VisionTransformer)."""
    return _micro(VisionTransformer, "mae_vit_micro_p8", pretrained, kwargs)


@register_model
def beit_micro_p8(pretrained: bool = False, **kwargs: Any) -> Beit:
    """Tests and the CPU quickstart: BEiT's ViT at the micro size, configured as timm's
    ``beit_base_patch16_224`` (relative position bias per block, no absolute table, layer scale 0.1)."""
    beit = dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    return _micro(Beit, "beit_micro_p8", pretrained, {**beit, **kwargs})


def _micro(cls: type, name: str, pretrained: bool, kwargs: dict[str, Any]):
    return build_model_with_cfg(
        cls, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=tuple(range(_MICRO_SIZE["depth"])), feature_cls="getter"),
        **{**_MICRO_SIZE, **kwargs},
    )
