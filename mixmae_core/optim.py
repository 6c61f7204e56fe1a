"""Optimizer and schedule of the paper recipes, built from timm's parts.

* AdamW with weight decay on matrices only (biases, norms, position tables and the mask
  token exempt via ``no_weight_decay``), optional layer-wise lr decay through the
  encoder's ``group_matcher`` (timm's ``param_groups_layer_decay``).
* Linear warmup from 0, then half-cosine to ``min_lr``, updated every optimizer step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
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
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs)


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
