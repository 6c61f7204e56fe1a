"""A stage's checkpoints in the pipeline's storage: their files, and which one a resumed run
starts from.

Ray Train keeps a trainer's checkpoints as ``<storage>/<trainer>/checkpoint_<timestamp>``.
A crash while one is written (a node lost mid-copy, a full disk) can leave the newest
truncated or without a file; resuming then starts from the newest one that loads, and the
ones passed over are copied to ``<storage>/corrupt_checkpoints/<trainer>/`` (Ray may prune
the originals later) and named in the message, never deleted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mixmae_core.checkpoint import load_state_dict

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
ENCODER_FILE = "encoder.safetensors"
CORRUPT_DIR = "corrupt_checkpoints"


@dataclass
class Loaded:
    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]


def load(directory: Path) -> Loaded:
    """Every file of a checkpoint, read in full (raises if any is missing or unreadable)."""
    meta = json.loads((directory / META_FILE).read_text())
    model = load_state_dict(directory / MODEL_FILE)
    trainer = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return Loaded(directory, meta, model, trainer)


def newest_loadable(latest: Path, skipped: list[str], keep_corrupt: bool) -> Optional[Loaded]:
    """``latest`` if it loads, else the newest older checkpoint of the same trainer that does
    (None if none). Each passed over is appended to ``skipped`` as ``"<name>: <why>"`` and,
    with ``keep_corrupt``, copied aside."""
    candidates = sorted((d for d in latest.parent.glob("checkpoint_*") if d.is_dir() and d.name <= latest.name),
                        reverse=True)  # Ray names them by timestamp
    for directory in candidates:
        try:
            return load(directory)
        except Exception as exc:  # truncated, missing, not what it claims to be
            skipped.append(f"{directory.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400])
            if keep_corrupt:
                aside = directory.parent.parent / CORRUPT_DIR / directory.parent.name / directory.name
                if not aside.exists():
                    shutil.copytree(directory, aside)
    return None
