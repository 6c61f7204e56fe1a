"""What every hierarchical encoder family shares: MixMAE's encoder contract and timm's model
protocol, written once over two hooks of the family; and the helpers that register a family's
variants with timm.

A family (``swin.py``, ``twins.py``, ``pvt_v2.py``) subclasses :class:`HierarchicalEncoder`
and writes

* ``_stem(images, groups)``: images -> stem tokens ``(B, H/4, W/4, C)``;
* ``_levels(x, groups, stop=None)``: stem tokens -> each level's map in turn (NHWC), the
  first ``stop`` levels only when given; ``groups`` as in ``forward_tokens``, on any device;
* ``norm``: the final norm of the last map;
* ``group_matcher`` (its layer ids), and ``no_weight_decay`` where it has exemptions.

Everything else, from ``embed`` and ``forward_tokens`` to ``forward_intermediates``, is here,
so every family answers the same calls the same way.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from mixmae_core.checkpoint import StateDict, adapt_to_encoder, encoder_state_dict
from mixmae_core.encoders.attention import get_attention

_TIMM_ARGUMENTS = {"pretrained_cfg", "pretrained_cfg_overlay"}


class HierarchicalEncoder(nn.Module):
    """MixMAE's encoder contract (``mixmae_core/mixmae.py``) and timm's classifier, feature
    and intermediates protocol, on top of a family's ``_stem`` and ``_levels``."""

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]],
        stride: int,
        num_classes: int,
        global_pool: str,
        attn_impl: str,
        timm_arguments: Mapping[str, Any],
    ):
        """``stride``: input pixels per last-level token (the mask unit); ``timm_arguments``:
        the family constructor's remaining keyword arguments, of which timm passes its own."""
        super().__init__()
        unexpected = timm_arguments.keys() - _TIMM_ARGUMENTS
        if unexpected:
            raise TypeError(f"unexpected arguments for {type(self).__name__}: {sorted(unexpected)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        self.stride = stride
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.set_attn_impl(attn_impl)

    def _init_head(self, num_features: int, drop_rate: float) -> None:
        """The classifier head on the pooled last map. Families call it after their levels, so
        a seed draws the levels' weights before the head's, as in timm's models."""
        self.num_features = self.head_hidden_size = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(self.num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------- the family's hooks
    def _stem(self, images: torch.Tensor, groups: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _levels(
        self, x: torch.Tensor, groups: Optional[torch.Tensor], stop: Optional[int] = None
    ) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------- timm protocol
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None beyond the 1-D parameters: MixMAE's fine-tuning decays the relative-position tables."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Every module that runs blocks (a level, or the model itself where its blocks sit
        in it) keeps a ``grad_checkpointing`` flag."""
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = self._new_head(num_classes)

    def set_attn_impl(self, name: str) -> None:
        """``name``: "reference", "sdpa" or "flex" (``mixmae_core.encoders.attention``)."""
        self.attn_impl = name
        self.attention = get_attention(name)

    # ----------------------------------------------------------------- the encoder contract
    def embed(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> stem tokens ``(B, H/4, W/4, C)``, each image on its own;
        with ``groups`` a token reads only pixels of units in its own group."""
        H, W = x.shape[-2:]
        if H % self.stride or W % self.stride:
            raise ValueError(f"input size {H}x{W} is not a multiple of the encoder stride {self.stride}")
        return self._stem(x, groups)

    def forward_tokens(
        self, x: torch.Tensor, groups: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem tokens (in pretraining, mixed) -> (final-normed last map, per-level maps), NHWC.

        ``groups``: bool ``(B, h, w)`` on the stride grid (any device), or None. With it,
        nothing that moves information between tokens crosses groups.
        """
        features = list(self._levels(x, groups))
        return self.norm(features[-1]), features

    # ----------------------------------------------------------------- classification and dense heads
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> normed final map ``(B, h, w, C)``."""
        return self.forward_tokens(self.embed(x))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Level feature maps for dense heads (timm's intermediates protocol; the getter of
        ``timm.create_model(..., features_only=True)``)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        last = len(self.feature_info) - 1
        intermediates = []
        for i, x in enumerate(self._levels(self.embed(x), None, stop=max_index + 1 if stop_early else None)):
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates


def run_block(block: nn.Module, *args: Any, grad_checkpointing: bool) -> torch.Tensor:
    """``block(*args)``, recomputed in the backward pass instead of kept when checkpointing."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def on_device_of(x: torch.Tensor, groups: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``groups`` (drawn on the CPU in pretraining) where ``x`` is."""
    return None if groups is None else groups.to(x.device, non_blocking=True)


# --------------------------------------------------------------------- timm registration


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """timm's ``pretrained_filter_fn``: any checkpoint layout ``load_encoder_weights`` reads
    (pretraining, classifier, official MixMIM, timm's own Twins and PVTv2), fitted to
    ``model``'s windows, size and head. Given through ``pretrained_cfg_overlay=dict(file=PATH)``:
    the configs carry no URL or hub id, so timm never fetches weights for these variants."""
    return adapt_to_encoder(encoder_state_dict(state_dict), model)


def default_cfgs_for(sizes: Mapping[str, int], first_conv: str, crop_pct: float) -> Any:
    """timm's ``default_cfgs`` of a family: per variant its input size; ``crop_pct`` the
    family's evaluation crop at 224 (other sizes are evaluated uncropped)."""
    return generate_default_cfgs(
        {
            name: dict(
                url="", num_classes=1000, input_size=(3, size, size), pool_size=None,
                crop_pct=crop_pct if size == 224 else 1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head", license="apache-2.0",
            )
            for name, size in sizes.items()
        }
    )


def build_encoder(
    model_cls: type[HierarchicalEncoder], name: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any
) -> HierarchicalEncoder:
    """A registered variant: ``model_args`` its architecture, ``kwargs`` the caller's
    overrides; ``features_only=True`` gives every level (or ``out_indices``) through
    ``forward_intermediates``."""
    kwargs = {**model_args, **kwargs}
    out_indices: Sequence[int] = kwargs.pop("out_indices", tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(
        model_cls,
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def apply_grad_checkpointing(model: nn.Module, enable: bool) -> nn.Module:
    """Switch timm's activation checkpointing (``set_grad_checkpointing``) on every module of
    a stage model that has it: the encoder, wherever the method or task model nests it
    (``.encoder``, a Mask R-CNN backbone's or smp's feature getter's ``.model``), or the model
    itself (a classifier)."""
    switches = [module for module in model.modules() if hasattr(module, "set_grad_checkpointing")]
    if enable and not switches:
        raise ValueError(
            f"{type(model).__name__} has no encoder with set_grad_checkpointing: set grad_checkpointing: false"
        )
    for module in switches:
        module.set_grad_checkpointing(enable)
    return model
