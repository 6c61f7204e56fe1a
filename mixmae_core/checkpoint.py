"""Checkpoints: safetensors I/O, official-checkpoint conversion, encoder extraction and resizing.

Key layouts understood by ``encoder_state_dict``:

* our pretraining model: ``encoder.*`` and ``decoder.*``;
* our classifier (timm layout, downsample at the start of stages 2-4, ``head.*``);
* the official Sense-X/MixMIM code (pretraining or fine-tuned): downsample at the end of
  stages 1-3, ``mask_token``/``decoder_*`` at top level, persistent position buffers; as
  ``main_pretrain.py`` / ``main_finetune.py`` save it (``model``, ``optimizer``, ``epoch``,
  ``scaler``, ``args``) or the bare ``model`` dict.

Every file is read with ``torch.load(weights_only=True)``, allowing exactly what those
files hold beyond tensors (an ``argparse.Namespace``); a file that is not a checkpoint is
refused with a :class:`CheckpointError` naming what was expected and what was found.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table, resize_rel_pos_bias_table_simple
from timm.models.beit import Beit

from mixmae_core.layers import interpolate_table, sincos_2d

StateDict = dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

_OFFICIAL_DECODER = {
    "mask_token": "decoder.mask_token",
    "decoder_embed.": "decoder.embed.",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}
_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")
#: The position grid of the official pretraining at 224 px, which its 384-px fine-tuning interpolates.
OFFICIAL_PRETRAIN_GRID = 56


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project reads; the message says what was expected and found."""


def save_state_dict(path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write a safetensors file atomically (a crash mid-write never leaves a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_state_dict(path: PathLike) -> StateDict:
    """Load safetensors, or a torch pickle with ``weights_only=True`` (``model``/``state_dict`` unwrapped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: expected a safetensors file, found one that does not read ({exc})") from None
    expected = "a state dict, or a training checkpoint with 'model' (and optimizer, epoch, scaler, args)"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = refused_global(exc)
        if not found:
            raise CheckpointError(f"{path}: expected {expected} saved by torch.save, found unreadable bytes") from None
        raise CheckpointError(
            f"{path}: expected {expected}, found an object of type {found}; not loaded (unsafe to unpickle)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: expected {expected} saved by torch.save, found unreadable bytes ({exc})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {sorted(obj)[:6]}"
        raise CheckpointError(f"{path}: expected {expected}, found {kind}")
    return dict(obj)


def refused_global(error: pickle.UnpicklingError) -> Optional[str]:
    """The global (``module.name``) a ``weights_only`` load refused to unpickle, if that was why it failed."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return found.group(1) if found else None


def checkpoint_info(path: PathLike) -> dict[str, str]:
    """What a safetensors file written by this project says of itself (``model``, ``method``,
    ``img_size``, ``source``), read from its header only; empty for other files."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def is_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "layers.0.downsample.reduction.weight" in state_dict or "decoder_pred.weight" in state_dict


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official MixMIM keys -> ours (pretraining: ``encoder.``/``decoder.`` prefixes; fine-tuned: timm layout).

    The encoder's position table is kept, as ``(h, w, C)``: the official 384-px fine-tuning
    interpolates the 224-px table rather than drawing a new one. Every table is checked to be
    the fixed 2-D sin-cos one, or one interpolated from the 224-px grid, so a checkpoint
    trained with another convention is refused, not misread.
    """
    pretraining = "decoder_pred.weight" in state_dict
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_BUFFERS):
            continue
        if key == "decoder_pos_embed":  # the decoder draws its own, at its fixed grid
            _check_sincos(key, value)
            continue
        if key == "absolute_pos_embed":
            value = _check_sincos(key, value)
        decoder_key = next((new + key[len(old) :] for old, new in _OFFICIAL_DECODER.items() if key.startswith(old)), None)
        if decoder_key is not None:
            out[decoder_key] = value
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[("encoder." if pretraining else "") + key] = value
    return out


#: (width, input size) of the official models -> the variant that reads them
_OFFICIAL_VARIANTS = {
    (128, 224): "mixmae_swin_base_w14", (192, 224): "mixmae_swin_large_w14", (352, 224): "mixmae_swin_huge_w14",
    (128, 384): "mixmae_swin_base_w16_384", (192, 384): "mixmae_swin_large_w16_384",
}


def official_variant(converted: Mapping[str, torch.Tensor]) -> Optional[tuple[str, int]]:
    """(variant name, input size) of a converted official checkpoint, told by its stem width and
    position table; None for a size this project has no variant of."""
    prefix = "encoder." if "encoder.patch_embed.proj.weight" in converted else ""
    width = converted[prefix + "patch_embed.proj.weight"].shape[0]
    table = converted.get(prefix + "absolute_pos_embed")
    size = 224 if table is None else table.shape[0] * 4
    name = _OFFICIAL_VARIANTS.get((width, size))
    return (name, size) if name else None


def _check_sincos(key: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` as an ``(h, w, C)`` table, if it is the fixed sin-cos one (at its own grid, or
    interpolated from the official 224-px grid); else a CheckpointError."""
    n, dim = value.shape[-2:]
    side = int(round(n**0.5))
    table = value.reshape(side, side, dim).float() if side * side == n else None
    candidates = (sincos_2d((side, side), dim), interpolate_table(sincos_2d((OFFICIAL_PRETRAIN_GRID,) * 2, dim), (side, side)))
    if table is None or not any(torch.allclose(table, c, atol=1e-5) for c in candidates):
        raise CheckpointError(
            f"{key}: expected the fixed 2-D sin-cos position table (or one interpolated from "
            f"{OFFICIAL_PRETRAIN_GRID}x{OFFICIAL_PRETRAIN_GRID}), found another {tuple(value.shape)} table"
        )
    return table


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The encoder (and classifier head, if any) weights of any supported checkpoint layout."""
    if is_official(state_dict):
        state_dict = convert_official(state_dict)
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("decoder.") and not k.endswith(_DROPPED_BUFFERS)}


_SHARED_BIAS = "rel_pos_bias.relative_position_bias_table"


def _bias_per_block(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> StateDict:
    """BEiT pretrains one relative-position table shared by its blocks; a model with a table
    per block (timm's BEiT variants, as fine-tuned) starts each from a copy, as BEiT's
    fine-tuning does."""
    if _SHARED_BIAS not in state_dict or _SHARED_BIAS in own:
        return dict(state_dict)
    out = {k: v for k, v in state_dict.items() if k != _SHARED_BIAS}
    out.update({k: state_dict[_SHARED_BIAS] for k in own if k.endswith("attn.relative_position_bias_table")})
    return out


def adapt_to_encoder(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Fit an encoder state dict to ``model``: give every block a copy of a shared relative-
    position table (BEiT), resize relative-position tables for other windows (bicubic, as the
    official fine-tuning; BEiT's with its own resizing, which keeps the class token's
    entries), interpolate absolute position tables for another image size (bicubic, as the
    official fine-tuning), and keep the model's own head when the checkpoint has none or
    another size. A final norm over every token (MAE's, BEiT's pretraining) is left out of a
    model that mean-pools: its pooled features get their own norm (``fc_norm``), fresh, as the
    official fine-tuning of either does."""
    own = model.state_dict()
    out: StateDict = {}
    for key, value in _bias_per_block(state_dict, own).items():
        if key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
            attn = model.get_submodule(key.rsplit(".", 1)[0])
            resize = resize_rel_pos_bias_table if isinstance(model, Beit) else resize_rel_pos_bias_table_simple
            value = resize(value, new_window_size=attn.window_size, new_bias_shape=tuple(own[key].shape))
        if key == "pos_embed" and key in own and own[key].shape != value.shape:  # a ViT at another size
            prefix = getattr(model, "num_prefix_tokens", 1)
            value = resample_abs_pos_embed(value, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
        if key == "absolute_pos_embed" and key in own and own[key].shape != value.shape:  # Swin at another size
            value = interpolate_table(value, tuple(own[key].shape[:2]))
        if key.startswith("head.") and (key not in own or own[key].shape != value.shape):
            continue
        if key.startswith("norm.") and key not in own and "fc_norm.weight" in own:
            continue
        out[key] = value
    for key in own:
        if key.startswith(("head.", "fc_norm.")) and key not in out:
            out[key] = own[key]
    return out


def load_encoder_weights(model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]], strict: bool = True):
    """Load pretraining, classifier or official weights into an encoder/classifier."""
    state_dict = load_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    return model.load_state_dict(adapt_to_encoder(encoder_state_dict(state_dict), model), strict=strict)
