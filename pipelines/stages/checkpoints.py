"""A stage's checkpoints in the pipeline's storage: their files, and which one a resumed run
starts from.

Ray Train keeps a trainer's checkpoints as ``<storage>/<trainer>/checkpoint_<timestamp>``,
in a folder or a bucket (:mod:`pipelines.storage`); one in a bucket is read from a copy on the
worker's disk. A crash while one is written (a node lost mid-copy, a full disk) can leave the
newest truncated or without a file; resuming then starts from the newest one that loads, and
the ones passed over are copied to ``<storage>/corrupt_checkpoints/<trainer>/`` (Ray may prune
the originals later) and named in the message, never deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mixmae_core.checkpoint import load_state_dict
from pipelines import storage

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
ENCODER_FILE = "encoder.safetensors"
CORRUPT_DIR = "corrupt_checkpoints"


@dataclass
class Loaded:
    path: str
    """Where the checkpoint is kept (a folder or an object store URI)."""
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]


def load(location: str) -> Loaded:
    """Every file of a checkpoint, read in full (raises if any is missing or unreadable)."""
    with storage.fetched(location) as directory:
        meta = json.loads((directory / META_FILE).read_text())
        model = load_state_dict(directory / MODEL_FILE)
        trainer = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return Loaded(location, meta, model, trainer)


def checkpoint_folders(trainer: str) -> list[str]:
    """The names of trainer folder ``trainer``'s checkpoints, newest first (Ray names them by timestamp)."""
    return sorted((name for name in storage.folders(trainer) if name.startswith("checkpoint_")), reverse=True)


def final_encoder(trainer: str, stage: str) -> Optional[str]:
    """The encoder ``stage`` exported with its newest final checkpoint among trainer folder
    ``trainer``'s (None: it has none). Reads only the meta files."""
    for name in checkpoint_folders(trainer):
        folder = storage.join(trainer, name)
        try:
            meta = json.loads(storage.read_text(storage.join(folder, META_FILE)))
        except (OSError, ValueError):  # being written, or truncated: not a finished stage's
            continue
        if meta.get("stage") == stage and meta.get("final") and storage.exists(storage.join(folder, ENCODER_FILE)):
            return storage.join(folder, ENCODER_FILE)
    return None


def newest_loadable(latest: str, skipped: list[str], keep_corrupt: bool) -> Optional[Loaded]:
    """``latest`` if it loads, else the newest older checkpoint of the same trainer that does
    (None if none). Each passed over is appended to ``skipped`` as ``"<name>: <why>"`` and,
    with ``keep_corrupt``, copied aside."""
    trainer = storage.parent(latest)
    for name in (name for name in checkpoint_folders(trainer) if name <= storage.name(latest)):
        directory = storage.join(trainer, name)
        try:
            return load(directory)
        except Exception as exc:  # truncated, missing, not what it claims to be
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400])
            if keep_corrupt:
                aside = storage.join(storage.parent(trainer), CORRUPT_DIR, storage.name(trainer), name)
                if not storage.exists(aside):
                    storage.copy_tree(directory, aside)
    return None
