"""Encoders, one file per family, each variant registered with timm: the hierarchical ones
under MixMAE's encoder contract (``mixmae_core/mixmae.py``): Swin, Twins-SVT, PVTv2; and plain
ViTs for MAE and BEiT. The contract and timm's protocol, written once over each family's stem
and levels, are ``base``; the segment-masked attention they share is ``attention``;
convolutions kept inside their group are ``convs``."""

import timm

from mixmae_core.encoders import vit  # noqa: F401  (registers the test-sized ViT and BEiT)
from mixmae_core.encoders.pvt_v2 import MixMAEPVTv2
from mixmae_core.encoders.swin import MixMAESwin
from mixmae_core.encoders.twins import MixMAETwins


def available_encoders() -> list[str]:
    """Every registered hierarchical encoder (MixMAE's and SimMIM's); ``timm.create_model`` builds each."""
    return timm.list_models("mixmae_*")


__all__ = ["MixMAEPVTv2", "MixMAESwin", "MixMAETwins", "available_encoders"]
