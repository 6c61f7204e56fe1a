"""Checkpoints: safetensors I/O, official-checkpoint conversion, encoder extraction and resizing.

Key layouts understood by ``encoder_state_dict``:

* our pretraining model: ``encoder.*`` and ``decoder.*``;
* our classifier (timm layout, downsample at the start of stages 2-4, ``head.*``);
* the official Sense-X/MixMIM code (pretraining or fine-tuned): downsample at the end of
  stages 1-3, ``mask_token``/``decoder_*`` at top level, persistent position buffers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.layers import resize_rel_pos_bias_table

from mixmae_core.layers import sincos_2d

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
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return dict(obj)


def is_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "layers.0.downsample.reduction.weight" in state_dict or "decoder_pred.weight" in state_dict


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official MixMIM keys -> ours (pretraining: ``encoder.``/``decoder.`` prefixes; fine-tuned: timm layout).

    The fixed sin-cos position tables are not weights in our model; they are checked
    against ours so a checkpoint trained with another convention is refused, not misread.
    """
    pretraining = "decoder_pred.weight" in state_dict
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_BUFFERS):
            continue
        if key in ("absolute_pos_embed", "decoder_pos_embed"):
            _check_sincos(key, value)
            continue
        decoder_key = next((new + key[len(old) :] for old, new in _OFFICIAL_DECODER.items() if key.startswith(old)), None)
        if decoder_key is not None:
            out[decoder_key] = value
            continue
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[("encoder." if pretraining else "") + key] = value
    return out


def _check_sincos(key: str, value: torch.Tensor) -> None:
    n, dim = value.shape[-2:]
    side = int(round(n**0.5))
    ours = sincos_2d((side, side), dim).flatten(0, 1)
    if side * side != n or not torch.allclose(value.reshape(n, dim).float(), ours, atol=1e-5):
        raise ValueError(f"{key} in the checkpoint is not the fixed 2-D sin-cos table this model uses")


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The encoder (and classifier head, if any) weights of any supported checkpoint layout."""
    if is_official(state_dict):
        state_dict = convert_official(state_dict)
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("decoder.") and not k.endswith(_DROPPED_BUFFERS)}


def adapt_to_encoder(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Fit an encoder state dict to ``model``: resize relative-position tables for other
    windows, and keep the model's own head when the checkpoint has none or another size."""
    own = model.state_dict()
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
            attn = model.get_submodule(key.rsplit(".", 1)[0])
            value = resize_rel_pos_bias_table(
                value, new_window_size=attn.window_size, new_bias_shape=tuple(own[key].shape)
            )
        if key.startswith("head.") and (key not in own or own[key].shape != value.shape):
            continue
        out[key] = value
    for key in own:
        if key.startswith("head.") and key not in out:
            out[key] = own[key]
    return out


def load_encoder_weights(model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]], strict: bool = True):
    """Load pretraining, classifier or official weights into an encoder/classifier."""
    state_dict = load_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    return model.load_state_dict(adapt_to_encoder(encoder_state_dict(state_dict), model), strict=strict)
