"""What a stage plugs into the training loop (:mod:`pipelines.stages.loop`): a :class:`Task`
builds the model and optimizer, reads this worker's micro-batches, computes the loss, and
may evaluate, draw pictures and export weights."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
import torch
import torch.nn as nn

from pipelines import storage
from pipelines.data.order import Shard
from pipelines.stages.distributed import world_rank, world_size
from pipelines.stages.jobs import StageJob


@dataclass
class MicroBatch:
    """One worker's micro-batch, still on the CPU: what the task's loss takes, and which
    images (and units of the worker's shard) it holds."""

    inputs: Any
    image_ids: torch.Tensor
    positions: torch.Tensor


class Task:
    """What a stage plugs into :func:`train`. Methods run on every worker unless noted."""

    headline: Optional[str] = None
    """The evaluation metric whose best value is also logged (as ``<headline>_best``)."""
    images_per_unit = 1
    """Images in one unit of the stage's training data (pretraining reads pairs)."""
    logs_model = True
    """Whether the stage's final weights become an MLflow model (``pipelines/stage_model.py``)."""

    def __init__(self, job: StageJob):
        self.job = _local_weights(job)
        self.spec = job.spec
        self.device = torch.device("cpu")

    def build(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batches(self, name: str, shard: Shard) -> Iterator[MicroBatch]:
        """This worker's micro-batches of dataset ``name`` (``train``, ``val``) in ``shard``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Scalar loss of a micro-batch (moved to the device here) at optimizer step ``step``,
        its number of images, and other scalars to log as ``train/<name>`` (averaged like the loss)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (every rank takes part; reduced across ranks)."""
        return {}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        """Rank 0 only: pictures to log at ``step``."""
        return []

    def picture_steps(self, total_steps: int) -> set[int]:
        return set()

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        """Rank 0 only: write ``encoder.safetensors`` (weights a later stage starts from) from
        ``state``, the model's whole state dict (gathered when the model is sharded)."""

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the workers (its forwards take every worker)."""
        return world_size() > 1 and self.spec.scaling.parallelism == "fsdp"

    def dataset(self, name: str, shard: Shard) -> "ray.data.Dataset":
        """Dataset ``name`` of the job, this worker's ``shard`` of it."""
        return self.job.data[name].build(shard, self.job.loop.data_cpus)

    def evaluation_shard(self) -> Shard:
        """This worker's contiguous slice of an evaluation split: every image scored once."""
        return Shard(rank=world_rank(), world=world_size())


def _local_weights(job: StageJob) -> StageJob:
    """``job`` with the weights it starts from on this node's disk: the model code reads files,
    and an earlier stage's encoder may be in a bucket."""
    local = {key: str(storage.local_copy(value)) for key in ("encoder_weights", "tokenizer_weights")
             if (value := getattr(job, key)) and storage.is_remote(value)}
    return replace(job, **local) if local else job


class StopTraining(Exception):
    """A condition on which every rank stops and the stage fails without a retry: retrying
    from the last checkpoint would meet it again (a diverged loss, too many bad images)."""
