"""Model variants, registered with timm (classifier/backbone) and for pretraining.

| name | C | depths | heads | windows | decoder | use |
|---|---|---|---|---|---|---|
| mixmae_swin_micro_w8 | 32 | 1,1,2,1 | 1,2,4,8 | 8,8,8,8 | 128 x 2, 4 heads | tests, CPU quickstart (64-128 px) |
| mixmae_swin_tiny_w14 | 96 | 2,2,6,2 | 3,6,12,24 | 14,14,14,7 | 512 x 8, 16 heads | single-GPU work |
| mixmae_swin_base_w14 | 128 | 2,2,18,2 | 4,8,16,32 | 14,14,14,7 | 512 x 8, 16 heads | paper (88M, 16.3G) |
| mixmae_swin_large_w14 | 192 | 2,2,18,2 | 6,12,24,48 | 14,14,14,7 | 512 x 8, 16 heads | paper (197M, 35.9G) |
| mixmae_swin_huge_w14 | 352 | 2,2,18,2 | 11,22,44,88 | 14,14,14,7 | 512 x 8, 16 heads | paper (~658M) |
| mixmae_swin_base_w16_384 / large | as B / L | | | 16,16,24,12 | | 384 px fine-tuning |
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from mixmae_core.checkpoint import timm_filter_fn
from mixmae_core.models.encoder import MixMAESwin
from mixmae_core.models.mixmae import MixMAE, MixMAEDecoder, MixMAEOutput

_PAPER_DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_W14 = (14, 14, 14, 7)

VARIANTS: dict[str, dict[str, Any]] = {
    "mixmae_swin_micro_w8": dict(
        img_size=64, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(8, 8, 8, 8)
    ),
    "mixmae_swin_tiny_w14": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=_W14),
    "mixmae_swin_base_w14": dict(**_B, window_size=_W14),
    "mixmae_swin_large_w14": dict(**_L, window_size=_W14),
    "mixmae_swin_huge_w14": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=_W14),
    "mixmae_swin_base_w16_384": dict(**_B, img_size=384, window_size=(16, 16, 24, 12)),
    "mixmae_swin_large_w16_384": dict(**_L, img_size=384, window_size=(16, 16, 24, 12)),
}
DECODERS: dict[str, dict[str, Any]] = {
    "mixmae_swin_micro_w8": dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
}
_MIXMAE_ARGS = ("decoder_dim", "decoder_depth", "decoder_num_heads", "mask_ratio", "mask_mode", "norm_pix_loss")


def _variant(name: str) -> dict[str, Any]:
    if name not in VARIANTS:
        raise ValueError(f"unknown MixMAE model {name!r}; choose one of {sorted(VARIANTS)}")
    return dict(VARIANTS[name])


def create_model(name: str, **overrides: Any) -> MixMAE:
    """The pretraining model of a variant; overrides may name encoder or MixMAE arguments."""
    kwargs = {**_variant(name), **_PAPER_DECODER, **DECODERS.get(name, {}), **overrides}
    return MixMAE(**kwargs)


def encoder_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Encoder arguments of a variant (pretraining-only arguments removed)."""
    kwargs = {**_variant(name), **overrides}
    return {k: v for k, v in kwargs.items() if k not in _MIXMAE_ARGS}


def _cfg(name: str) -> dict[str, Any]:
    size = VARIANTS[name].get("img_size", 224)
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, size, size),
        pool_size=None,
        crop_pct=0.875 if size == 224 else 1.0,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in VARIANTS})


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
    kwargs = encoder_config(name, **kwargs)
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        MixMAESwin,
        name,
        pretrained,
        pretrained_filter_fn=timm_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _register(name: str) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> MixMAESwin:
        return _create(name, pretrained, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"MixMAE encoder {name} (classifier / backbone)."
    fn.__module__ = __name__
    register_model(fn)


for _name in VARIANTS:
    _register(_name)

__all__ = ["MixMAE", "MixMAEDecoder", "MixMAEOutput", "MixMAESwin", "VARIANTS", "create_model", "encoder_config"]
