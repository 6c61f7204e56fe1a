"""Hierarchical encoders under MixMAE's encoder contract (``mixmae_core/mixmae.py``), one file
per family, each variant registered with timm; the segment-masked attention they share is
``attention``."""

import timm

from mixmae_core.encoders.swin import MixMAESwin


def available_encoders() -> list[str]:
    """Every registered encoder variant (``timm.create_model`` builds each)."""
    return timm.list_models("mixmae_*")


__all__ = ["MixMAESwin", "available_encoders"]
