"""Encoders for transfer: fine-tuned classifier, linear probe, and the trunk dense heads share.

Every builder takes a registered encoder name, the input size and optionally a checkpoint
(pretraining, classifier or official layout: ``load_encoder_weights`` sorts it out), and
never downloads anything.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from mixmae_core.checkpoint import PathLike, StateDict, load_encoder_weights

EncoderWeights = Optional[Union[PathLike, StateDict]]


class EncoderAttention:
    """Mixin for task models that nest an encoder (hierarchical, or MAE's plain ViT).

    ``set_attn_impl`` lets callers switch the attention kernel of the whole task model,
    e.g. to ``"reference"`` so ``mixmae_core.flops.forward_macs`` sees every attention matmul
    (the FLOP counter does not count fused CPU attention). ``group_matcher`` and
    ``no_weight_decay`` expose the encoder's layer groups under their prefix, so timm's
    layer-wise lr decay and weight-decay exemptions work on the whole task model (heads
    fall into the last group: full learning rate).
    """

    def _encoder(self) -> tuple[str, nn.Module]:
        return next((name, m) for name, m in self.named_modules() if m is not self and is_encoder(m))

    def set_attn_impl(self, name: str) -> None:
        encoder = self._encoder()[1]
        if hasattr(encoder, "set_attn_impl"):  # a ViT's attention is timm's own
            encoder.set_attn_impl(name)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        prefix, encoder = self._encoder()
        inner = encoder.group_matcher(coarse)
        scoped = f"^{re.escape(prefix)}\\."

        def scope(pattern: str) -> str:
            return scoped + pattern.removeprefix("^")

        blocks = inner["blocks"]
        return dict(
            stem=scope(inner["stem"]),
            blocks=scope(blocks) if isinstance(blocks, str) else [(scope(p), idx) for p, idx in blocks],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        prefix, encoder = self._encoder()
        return {f"{prefix}.{name}" for name in encoder.no_weight_decay()}


def is_encoder(module: nn.Module) -> bool:
    """Whether ``module`` is an encoder with timm's protocol (layer groups, a pooled head)."""
    return hasattr(module, "group_matcher") and hasattr(module, "forward_head")


def prepare_dense_trunk(trunk: nn.Module, encoder_weights: EncoderWeights = None) -> None:
    """Load weights into a trunk used through its stage maps, then drop its final norm.

    Dense heads normalise every stage map themselves, so the pretrained final norm would be
    a parameter without gradient, which DistributedDataParallel refuses by default.
    """
    if encoder_weights is not None:
        load_encoder_weights(trunk, encoder_weights)
    trunk.norm = nn.Identity()


def create_encoder(
    name: str,
    *,
    img_size: int,
    encoder_weights: EncoderWeights = None,
    drop_path_rate: float = 0.1,
    features_only: bool = False,
    **overrides: Any,
) -> nn.Module:
    """``timm.create_model`` of a MixMAE variant with encoder weights loaded.

    ``features_only=True`` returns timm's ``FeatureGetterNet`` (``.model`` is the
    encoder; forward gives the four NCHW stage maps) without head or final norm.
    """
    if features_only:
        overrides = {**overrides, "num_classes": 0}
    model = timm.create_model(
        name,
        pretrained=False,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        features_only=features_only,
        **overrides,
    )
    if features_only:
        prepare_dense_trunk(model.model, encoder_weights)
    elif encoder_weights is not None:
        load_encoder_weights(model, encoder_weights)
    return model


def build_classifier(
    encoder: str,
    num_classes: int,
    *,
    img_size: int,
    encoder_weights: EncoderWeights = None,
    drop_path_rate: float = 0.1,
    **overrides: Any,
) -> nn.Module:
    """Fine-tuning classifier: encoder, global average pooling, linear head. From pretrained
    weights the head's weight starts as the official fine-tuning starts it,
    ``trunc_normal_(std=2e-5)`` (near zero: the first steps do not scramble the encoder)."""
    model = create_encoder(
        encoder,
        img_size=img_size,
        encoder_weights=encoder_weights,
        drop_path_rate=drop_path_rate,
        num_classes=num_classes,
        **overrides,
    )
    if encoder_weights is not None:
        trunc_normal_(model.get_classifier().weight, std=2e-5)
    return model


class LinearProbe(EncoderAttention, nn.Module):
    """Frozen encoder + MAE's linear-probing head (BatchNorm1d without affine, then Linear).

    The parameter-free BatchNorm whitens the pooled features so one learning rate suits
    encoders whose feature scales differ (MAE's linear-probing recipe). The encoder stays in eval
    mode whatever ``train()`` is called with, so drop path and dropout never perturb the
    features being probed.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.head = nn.Sequential(
            nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
            nn.Linear(encoder.num_features, num_classes),
        )
        # MAE's linear-probing initialisation
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The head's parameters: what the optimizer (and DDP) should see."""
        return self.head.parameters()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, final-normed encoder features ``(B, C)``."""
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_linear_probe(
    encoder: str,
    num_classes: int,
    *,
    img_size: int,
    encoder_weights: EncoderWeights = None,
    **overrides: Any,
) -> LinearProbe:
    """Linear probe on a frozen encoder; train ``model.trainable_parameters()`` only."""
    trunk = create_encoder(
        encoder, img_size=img_size, encoder_weights=encoder_weights, drop_path_rate=0.0, num_classes=0, **overrides
    )
    return LinearProbe(trunk, num_classes)
