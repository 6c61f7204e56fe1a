"""The fast pretraining path, selectable; the reference path stays the default.

``StepOptions.fast(device)`` is the combination ``benchmarks/pretrain_throughput.py``
measured fastest on a GPU: bf16 autocast, fused AdamW, ``split_groups`` and the whole
forward compiled, with SDPA attention. It agrees with the reference step to float noise
(``tests/test_core_fast.py`` on the CPU, the benchmark on the GPU).

* ``split_groups=True``: levels whose window covers the map (3 and 4 at 224, 20 of the 24
  blocks of Swin-B) run one sequence per (image, group), so no attention work is spent on
  cross-image pairs there. Windows of levels 1-2 straddle mask units and keep the mask.
* ``compile="model"``: one graph for the forward (and its backward) fuses norms,
  activations, residuals, the layout gathers and the bias construction, and removes most
  per-op launch overhead; ``compile="blocks"`` compiles per transformer block (each distinct
  shape once), which compiles faster.
* ``attn_impl="flex"`` (FlexAttention) is selectable too; the benchmark's table says why
  the fast path does not pick it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from mixmae_core.encoders.swin import SwinBlock
from mixmae_core.optim import build_optimizer


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every transformer block in place (encoder and decoder)."""
    from timm.models.vision_transformer import Block

    _raise_cache_limits()
    for module in model.modules():
        if isinstance(module, (SwinBlock, Block)):
            module.compile(dynamic=False, **compile_kwargs)
    return model


def _raise_cache_limits() -> None:
    # one graph per distinct block shape, for each of several variants in one process
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)


@dataclass(frozen=True)
class StepOptions:
    """How a pretraining step runs. ``FAST`` on GPU; the defaults are the reference path."""

    attn_impl: str = "sdpa"
    split_groups: bool = False
    compile: str = "off"
    """``"off"``, ``"blocks"`` (each transformer block) or ``"model"`` (the whole forward)."""
    fused_adamw: bool = False
    bf16: bool = False

    @staticmethod
    def fast(device: torch.device) -> "StepOptions":
        cuda = torch.device(device).type == "cuda"
        return StepOptions(attn_impl="sdpa", split_groups=True, compile="model", fused_adamw=True, bf16=cuda)


def apply_step_options(model: nn.Module, options: StepOptions) -> nn.Module:
    """Switch a pretraining model (or encoder) to ``options``' attention, layout and
    compilation; what an encoder does not have (a ViT's attention choice, Twins' and PVTv2's
    group split) is left alone."""
    if options.compile not in ("off", "blocks", "model"):
        raise ValueError(f"compile must be 'off', 'blocks' or 'model', got {options.compile!r}")
    encoder = getattr(model, "encoder", model)
    if hasattr(encoder, "set_attn_impl"):
        encoder.set_attn_impl(options.attn_impl)
    if hasattr(encoder, "set_split_groups"):
        encoder.set_split_groups(options.split_groups)
    if options.compile == "model":
        _raise_cache_limits()
        model.compile(dynamic=False)
    return compile_blocks(model) if options.compile == "blocks" else model


def autocast_for(device: torch.device, options: StepOptions):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if options.bf16 else nullcontext()


def make_train_step(
    model: nn.Module,
    options: StepOptions,
    lr: float = 1.5e-4,
    weight_decay: float = 0.05,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.optim.Optimizer]:
    """A ``step(images, masks) -> loss`` closure (forward, backward, AdamW update); ``masks``
    as the model's ``mask_spec`` draws them."""
    device = next(model.parameters()).device
    optimizer = optimizer or build_optimizer(model, lr, weight_decay, fused=options.fused_adamw)

    def step(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with autocast_for(device, options):
            loss = model(images, masks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer
