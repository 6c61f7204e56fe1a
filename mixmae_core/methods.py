"""The pretraining methods side by side: which encoders each can drive, and one factory.

| method | file | encoder | what the encoder sees |
|---|---|---|---|
| mixmae | ``mixmae.py`` | hierarchical (Swin, Twins, PVTv2) | two images mixed, every token a real one |
| simmim | ``simmim.py`` | hierarchical | every token, masked ones as [MASK] |
| mae | ``mae.py`` | plain ViT | the 25% of the tokens it keeps |
"""

from __future__ import annotations

from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from mixmae_core import mae, mixmae, simmim
from mixmae_core.encoders import available_encoders

FACTORIES = {"mixmae": mixmae.create_model, "simmim": simmim.create_model, "mae": mae.create_model}
METHODS = tuple(FACTORIES)
METHOD_ARGS = {"mixmae": mixmae.METHOD_ARGS, "simmim": ("mask_ratio",), "mae": mae.METHOD_ARGS}
"""The keyword arguments of each method's ``create_model`` that are the method's, not the encoder's."""


def is_plain_vit(encoder: str) -> bool:
    """Whether ``encoder`` names a timm ``VisionTransformer`` (built on the meta device: no memory, no time)."""
    if not timm.is_model(encoder):
        return False
    with torch.device("meta"):
        return isinstance(timm.create_model(encoder), VisionTransformer)


def check_method_encoder(method: str, encoder: str) -> None:
    """Refuse, with the reason, a method that cannot drive ``encoder``."""
    if method not in FACTORIES:
        raise ValueError(f"unknown pretraining method {method!r}; choose one of {list(METHODS)}")
    hierarchical = encoder in available_encoders()
    if method == "mae":
        if not is_plain_vit(encoder):
            raise ValueError(
                f"MAE drives a plain ViT (vit_base_patch16_224 in its paper, mae_vit_micro_p8 for tests), not "
                f"{encoder!r}: its encoder sees only the 25% of the tokens it keeps, and a hierarchical "
                "encoder's windows and merges need the whole grid. Pretrain hierarchical encoders with mixmae or simmim."
            )
    elif not hierarchical:
        vit = " (a plain ViT: pretrain it with mae)" if is_plain_vit(encoder) else ""
        raise ValueError(
            f"{method} pretrains a hierarchical encoder under MixMAE's contract, one of {available_encoders()}; "
            f"got {encoder!r}{vit}"
        )


def create_pretraining_model(method: str, encoder: str, **kwargs: Any) -> nn.Module:
    """``method``'s pretraining model on ``encoder``; ``kwargs`` name the method's arguments
    (``METHOD_ARGS[method]``) or the encoder's."""
    check_method_encoder(method, encoder)
    return FACTORIES[method](encoder, **kwargs)


def encoder_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the method's own arguments: what the bare encoder takes."""
    return {k: v for k, v in kwargs.items() if k not in METHOD_ARGS[method]}


def pretraining_step(model: nn.Module, images: torch.Tensor, mask: Optional[torch.Tensor]):
    """The method's output on a batch: MixMAE and SimMIM take the data pipeline's pair masks
    (drawn from each pair's seed, so a resumed run sees the same ones); MAE drops patches with
    torch's generator. ``model`` may be wrapped (DDP, compile): it is called, not unwrapped."""
    method = getattr(model, "module", model)
    method = getattr(method, "_orig_mod", method)
    return model(images, mask) if method.uses_pair_masks else model(images)
