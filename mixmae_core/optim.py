"""Optimizer and schedule of the official recipes, built from timm's parts.

Weight decay, grouped as the official code groups it (the models' ``no_weight_decay``):

* pretraining: MixMAE and MAE exempt 1-D parameters and biases only (timm's
  ``add_weight_decay`` with no skip list), so relative-position tables and mask tokens
  decay; SimMIM also exempts its mask token and Swin's relative-position tables (its own code);
* fine-tuning: every parameter but the 1-D ones and the encoder's ``no_weight_decay()``
  (empty for MixMAE's Swin, as its fine-tuning model's; timm's own for Twins and ViTs).

Layer-wise lr decay, as the official code assigns it: the stem at layer 0, block i of N at
layer i, a patch merge with the next level's first block, and the final norm and the
classification head with the last block (MixMAE's ``get_layer_id_for_mixmim``: the encoders'
``group_matcher``), each at ``decay ** (N + 1 - layer)``. A plain ViT follows MAE's
``get_layer_id_for_vit`` instead (BEiT's ``get_num_layer_for_vit`` gives its ViT the same
ids): its final norm and head at layer N + 1, scale 1.

The schedule: linear warmup from 0, then half-cosine to ``min_lr``, every optimizer step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.scheduler import CosineLRScheduler


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MAE/MixMAE: ``lr = base_lr * batch / 256``."""
    return base_lr * global_batch / 256


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    layer_decay: Optional[float] = None,
    fused: bool = False,
    opt: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW by default; ``opt="lars"`` (momentum 0.9) is MAE's linear-probing optimizer.
    Frozen parameters (``requires_grad=False``) are left out."""
    if opt == "adamw":
        kwargs = dict(betas=betas, **(dict(fused=True) if fused else {}))
    elif opt in ("lars", "sgd"):
        kwargs = dict(momentum=0.9)
    else:
        raise ValueError(f"optimizer must be adamw, lars or sgd, got {opt!r}")
    if layer_decay is None:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
    vit = isinstance(model, (VisionTransformer, Beit))
    groups = param_groups_layer_decay(
        _MAELayers(model) if vit else model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
        layer_decay=layer_decay,
    )
    if hasattr(model, "forward_head") and not vit:
        # MixMAE's classifier counts N + 1 layers for N blocks and fills the top one with nothing:
        # every scale is one factor below timm's, so the head and final norm train at ``decay``
        for group in groups:
            group["lr_scale"] *= layer_decay
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


class _MAELayers:
    """A plain ViT seen through MAE's layer ids (timm's own matcher puts the final norm with
    the last block, MAE's with the head)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self):
        return self.model.named_parameters()

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^reg_token|^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> CosineLRScheduler:
    """Per-step schedule: call ``scheduler.step_update(step)`` before each optimizer step."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
