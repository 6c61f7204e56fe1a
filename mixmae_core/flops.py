"""Parameter and FLOP counts, measured with ``torch.utils.flop_counter`` on the real modules.

Two conventions, both reported:

* **GFLOPs (paper convention)**: multiply-adds of one forward pass of encoder + classifier
  head at the given input size, as fvcore and the paper's tables count them.
* **training FLOPs per image**: true FLOPs (2 per multiply-add) of one forward + backward
  step of the pretraining model, per image, as the throughput benchmark uses.

Attention is counted with the ``reference`` implementation so that every matmul is seen
by the counter (fused kernels are counted the same, but not on every backend).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class FlopReport:
    model: str
    img_size: int
    params_m: float
    """Encoder + 1000-class head parameters, millions."""
    gflops: float
    """Multiply-adds of one encoder + head forward, GMACs (the paper's 'GFLOPs')."""
    pretrain_params_m: float
    """Encoder + decoder parameters of the pretraining model, millions."""
    train_gflops_per_image: float
    """True FLOPs (2 per MAC) of one pretraining forward + backward, per image."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _with_reference_attention(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    if hasattr(model, "set_attn_impl"):
        model.set_attn_impl("reference")
    return model


def forward_macs(model: nn.Module, inputs: torch.Tensor) -> float:
    """Multiply-adds of ``model(inputs)`` per sample."""
    model = _with_reference_attention(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() / 2 / inputs.shape[0]


def train_step_flops(model: nn.Module, images: torch.Tensor) -> float:
    """True FLOPs of forward + backward of a pretraining model (returns ``.loss``), per image."""
    model = _with_reference_attention(model).train()
    with FlopCounterMode(display=False) as counter:
        model(images).loss.backward()
    return counter.get_total_flops() / images.shape[0]


def flop_report(name: str, img_size: int | None = None, **overrides: Any) -> FlopReport:
    import timm

    from mixmae_core.mixmae import METHOD_ARGS, create_model

    size = img_size or timm.get_pretrained_cfg(name).input_size[-1]
    kwargs = dict(overrides, img_size=size)
    classifier = timm.create_model(name, num_classes=1000, **{k: v for k, v in kwargs.items() if k not in METHOD_ARGS})
    pretrain = create_model(name, **kwargs)
    images = torch.randn(2, 3, size, size)
    return FlopReport(
        model=name,
        img_size=size,
        params_m=count_params(classifier) / 1e6,
        gflops=forward_macs(classifier, images[:1]) / 1e9,
        pretrain_params_m=count_params(pretrain) / 1e6,
        train_gflops_per_image=train_step_flops(pretrain, images) / 1e9,
    )
