"""Parameter and FLOP counts, measured with ``torch.utils.flop_counter`` on the real modules.

Two conventions, both reported:

* **GFLOPs (paper convention)**: multiply-adds of one forward pass of encoder + classifier
  head at the given input size, as fvcore and the paper's tables count them.
* **training FLOPs per image**: true FLOPs (2 per multiply-add) of one forward + backward
  step of a method's pretraining model, per image, as it really runs: MixMAE's encoder on
  every (mixed) token, SimMIM's and BEiT's on every token including [MASK], MAE's on the
  tokens it keeps; convolutions run per group (PVTv2, Twins) counted twice; BEiT's frozen
  tokenizer, which reads every image in every step, counted with its forward.

Attention is counted with the ``reference`` implementation (and timm's attention unfused) so
that every matmul is seen by the counter, which does not see fused attention on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


@dataclass(frozen=True)
class FlopReport:
    model: str
    img_size: int
    method: str
    params_m: float
    """Encoder + 1000-class head parameters, millions."""
    gflops: float
    """Multiply-adds of one encoder + head forward, GMACs (the paper's 'GFLOPs')."""
    pretrain_params_m: float
    """Parameters of the method's pretraining model (encoder, decoder, tokens; BEiT's frozen tokenizer), millions."""
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
    for module in model.modules():
        if getattr(module, "fused_attn", False):  # timm's attention (ViT, decoders)
            module.fused_attn = False
    return model


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient of a convolution costs what its forward does. torch's own formula counts
    the weight gradient as if ``groups`` were 1: a depthwise convolution's as a dense one's."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def counting() -> FlopCounterMode:
    """A FLOP counter with convolution gradients counted right."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def forward_macs(model: nn.Module, inputs: torch.Tensor) -> float:
    """Multiply-adds of ``model(inputs)`` per sample."""
    model = _with_reference_attention(model).eval()
    with torch.no_grad(), counting() as counter:
        model(inputs)
    return counter.get_total_flops() / 2 / inputs.shape[0]


def train_step_flops(model: nn.Module, images: torch.Tensor) -> float:
    """True FLOPs of forward + backward of a pretraining model on ``images`` (rows in pairs),
    with masks drawn from its ``mask_spec`` as the data pipeline draws them, per image."""
    masks = model.mask_spec.draw_rows(range(images.shape[0] // 2))
    model = _with_reference_attention(model).train()
    with counting() as counter:
        model(images, masks).loss.backward()
    return counter.get_total_flops() / images.shape[0]


def flop_report(name: str, img_size: int | None = None, method: str = "mixmae", **overrides: Any) -> FlopReport:
    """Sizes and FLOPs of encoder ``name`` and of ``method``'s pretraining model on it.

    Counted on the meta device (as is :func:`classifier_cost`): the counter needs shapes
    only, so no weight is initialised and no arithmetic runs (Swin-L: a second, not ten)."""
    import timm

    from mixmae_core.methods import create_pretraining_model, encoder_kwargs

    size = img_size or timm.get_pretrained_cfg(name).input_size[-1]
    kwargs = dict(overrides, img_size=size)
    params_m, gflops = classifier_cost(name, size, **encoder_kwargs(method, overrides))
    with torch.device("meta"):
        pretrain = create_pretraining_model(method, name, **kwargs)
        train_flops = train_step_flops(pretrain, torch.randn(2, 3, size, size))
    return FlopReport(
        model=name,
        img_size=size,
        method=method,
        params_m=params_m,
        gflops=gflops,
        pretrain_params_m=count_params(pretrain) / 1e6,
        train_gflops_per_image=train_flops / 1e9,
    )


def timm_counterpart(name: str) -> str | None:
    """timm's own model of the same name (``mixmae_twins_svt_small`` -> ``twins_svt_small``), if any."""
    import timm

    other = name.removeprefix("mixmae_")
    return other if other != name and timm.is_model(other) else None


def classifier_cost(name: str, img_size: int, **overrides: Any) -> tuple[float, float]:
    """(parameters in millions, GMACs of one forward) of timm model ``name`` with a 1000-class head."""
    import timm

    with torch.device("meta"):
        try:
            model = timm.create_model(name, num_classes=1000, img_size=img_size, **overrides)
        except TypeError:  # some of timm's own models (PVTv2) take any input size but no img_size
            model = timm.create_model(name, num_classes=1000, **overrides)
        return count_params(model) / 1e6, forward_macs(model, torch.randn(1, 3, img_size, img_size)) / 1e9
