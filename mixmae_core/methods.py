"""The pretraining methods side by side: one registry, one factory, one training step.

| method | file | encoder | what the encoder sees |
|---|---|---|---|
| mixmae | ``mixmae.py`` | hierarchical (Swin, Twins, PVTv2) | two images mixed, every token a real one |
| simmim | ``simmim.py`` | hierarchical | every token, masked 32-px units as [MASK] |
| mae | ``mae.py`` | plain ViT | the 25% of the tokens it keeps |
| beit | ``beit.py`` | timm BEiT | every token, masked blocks of patches as [MASK] |

Every method is used the same way:

* ``create_pretraining_model(method, encoder, img_size=..., mask_ratio=..., **options)``;
* ``mask_spec(...)`` (or ``model.mask_spec``): the data pipeline draws each pair unit's
  masks with ``spec.draw(seed)`` -> ``(2, h, w)``, stacked per row;
* ``model(images, masks) -> PretrainOutput`` (``loss``, ``pred``, ``masks``, ``metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import timm
import torch
import torch.nn as nn
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from mixmae_core import beit, mae, mixmae, simmim
from mixmae_core.encoders import available_encoders
from mixmae_core.masking import MaskSpec, PretrainOutput, pair_rows

EncoderKind = Literal["hierarchical", "vit", "beit"]
KIND_NAMES: dict[str, str] = {"hierarchical": "a hierarchical encoder", "vit": "a plain ViT", "beit": "a BEiT"}


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    build: Callable[..., nn.Module]
    """``build(encoder, **kwargs)``: the method's own ``options`` go to it, the rest to the encoder."""
    encoder_kind: EncoderKind
    options: tuple[str, ...]
    needs: str
    """The encoders it takes, and why, for the message that refuses another."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("mixmae", "MixMAE", mixmae.create_model, "hierarchical", mixmae.OPTIONS,
               "a hierarchical encoder that keeps its contract (mixmae_core/mixmae.py): nothing moves "
               "information between the two images of a mixed input"),
        Method("simmim", "SimMIM", simmim.create_model, "hierarchical", simmim.OPTIONS,
               "a hierarchical encoder (MixMAE's baseline on MixMAE's encoders): its [MASK] units are their "
               "stride-32 units"),
        Method("mae", "MAE", mae.create_model, "vit", mae.OPTIONS,
               "a plain ViT (vit_base_patch16_224 in its paper, mae_vit_micro_p8 for tests): its encoder sees "
               "only the 25% of the tokens it keeps, and a hierarchical encoder's windows and merges need the "
               "whole grid"),
        Method("beit", "BEiT", beit.create_model, "beit", beit.OPTIONS,
               "a timm BEiT (beit_base_patch16_224 in its paper, beit_micro_p8 for tests): its [MASK] "
               "embedding, shared relative position bias and token targets sit on a ViT's patch grid"),
    )
}


def encoder_kind(encoder: str) -> Optional[EncoderKind]:
    """Which methods' encoder ``encoder`` is (built on the meta device: no memory, no time);
    None for a model no method pretrains."""
    if encoder in available_encoders():
        return "hierarchical"
    if not timm.is_model(encoder):
        return None
    with torch.device("meta"):
        model = timm.create_model(encoder)
    return "vit" if isinstance(model, VisionTransformer) else "beit" if isinstance(model, Beit) else None


def default_method(encoder: str) -> str:
    """The first method that pretrains ``encoder``'s kind (MixMAE for a hierarchical one)."""
    kind = encoder_kind(encoder)
    return next((name for name, m in METHODS.items() if m.encoder_kind == kind), "mixmae")


def check_method_encoder(method: str, encoder: str) -> None:
    """Refuse, with the reason, a method that cannot drive ``encoder``."""
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; choose one of {list(METHODS)}")
    m, kind = METHODS[method], encoder_kind(encoder)
    if kind != m.encoder_kind:
        takers = " or ".join(name for name, other in METHODS.items() if other.encoder_kind == kind)
        found = f"{KIND_NAMES[kind]}: pretrain it with {takers}" if kind else "which no method here pretrains"
        hierarchical = f"; hierarchical ones: {available_encoders()}" if m.encoder_kind == "hierarchical" else ""
        raise ValueError(f"{m.title} pretrains {m.needs}; got {encoder!r} ({found}){hierarchical}")


def create_pretraining_model(
    method: str, encoder: str, *, img_size: Optional[int] = None, mask_ratio: Optional[float] = None, **options: Any
) -> nn.Module:
    """``method``'s pretraining model on ``encoder``. ``options`` name the method's own
    arguments (``METHODS[method].options``: MixMAE's ``mask_mode``, MAE's ``norm_pix_loss``,
    BEiT's ``tokenizer``, ...) or the encoder's; ``None`` keeps the method's paper default."""
    check_method_encoder(method, encoder)
    given = {k: v for k, v in dict(img_size=img_size, mask_ratio=mask_ratio).items() if v is not None}
    return METHODS[method].build(encoder, **given, **options)


def mask_spec(
    method: str, encoder: str, *, img_size: Optional[int] = None, mask_ratio: Optional[float] = None, **options: Any
) -> MaskSpec:
    """How the data pipeline draws ``method``'s masks (read off the model built on the meta device)."""
    with torch.device("meta"):
        return create_pretraining_model(method, encoder, img_size=img_size, mask_ratio=mask_ratio, **options).mask_spec


def encoder_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the method's own arguments: what the bare encoder takes."""
    return {k: v for k, v in kwargs.items() if k not in METHODS[method].options}


def pretraining_step(model: nn.Module, images: torch.Tensor, pair_masks: torch.Tensor) -> PretrainOutput:
    """Bridge for the data path that still draws MixMAE's stride-32 pair masks ``(B//2, h, w)``
    for every method (``pipelines/stages/pretrain.py``); it goes when the stage draws each
    pair's masks from ``mask_spec``. Pair masks on the method's own grid serve both rows of
    their pair (as before); MAE and BEiT draw theirs from their spec, seeded from torch's
    generator. ``model`` may be wrapped (DDP, compile): it is called, not unwrapped."""
    method = getattr(model, "module", model)
    spec = getattr(method, "_orig_mod", method).mask_spec
    if spec.layout != "blocks" and tuple(pair_masks.shape[-2:]) == spec.grid:
        masks = pair_rows(pair_masks)
    else:
        masks = spec.draw_rows(torch.randint(2**31, (images.shape[0] // 2,)).tolist())
    return model(images, masks)
