"""What the transfer stages' workers share: model placement, the optimizer with layer-wise
lr decay, their Ray Data shards, and the exported weights."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from mixmae_core.checkpoint import save_state_dict
from mixmae_core.encoders.base import apply_grad_checkpointing
from mixmae_core.optim import build_optimizer
from pipelines.data.collate import normalize_on_device
from pipelines.data.order import Shard
from pipelines.stages.checkpoints import ENCODER_FILE
from pipelines.stages.task import MicroBatch, Task


class TransferTask(Task):
    """A task model on the job's encoder; subclasses say how it is built and trained."""

    layer_decay_applies = True

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        model = apply_grad_checkpointing(self.build_model().to(device), self.spec.grad_checkpointing)
        if self.spec.fast and device.type == "cuda":
            model.compile(dynamic=False)
        return model

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        spec = self.spec
        return build_optimizer(
            model, lr, spec.weight_decay, tuple(spec.betas), spec.layer_decay if self.layer_decay_applies else None,
            fused=spec.fast and self.device.type == "cuda", opt=spec.optimizer,
        )

    def rows(self, name: str, shard: Shard, **kwargs) -> Iterator[dict]:
        """Collated batches of dataset ``name`` in ``shard`` (whole micro-batches in training)."""
        yield from self.dataset(name, shard).iter_torch_batches(
            batch_size=self.spec.micro_batch(), device="cpu", prefetch_batches=2, drop_last=name == "train", **kwargs
        )

    def batches(self, name: str, shard: Shard) -> Iterator[MicroBatch]:
        for batch in self.rows(name, shard):
            yield MicroBatch(batch, batch["image_id"], batch["position"])

    def evaluation_batches(self, **kwargs) -> Iterator[dict]:
        """This worker's share of the validation split (every image once across workers)."""
        return self.rows("val", self.evaluation_shard(), **kwargs)

    def images(self, batch: dict) -> torch.Tensor:
        return normalize_on_device(batch["image"].to(self.device, non_blocking=True))

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        meta = {"model": self.job.model, "img_size": self.spec.img_size, "source": f"mixmae-{self.job.name}"}
        save_state_dict(out / ENCODER_FILE, state, meta)
