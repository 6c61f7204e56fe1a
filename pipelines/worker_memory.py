"""What one training worker of a stage holds in accelerator memory: the plan's arithmetic over
a model's measured costs (:func:`pipelines.memory.model_costs`), without torch.

Per worker, for its micro-batch ``batch_size / (num_workers x accum_steps)``:

* **weights**: every parameter and buffer in fp32 (bf16 autocast keeps fp32 weights and casts
  them per forward; those copies are activations);
* **gradients**: fp32, one per trainable parameter; with more than one worker,
  DistributedDataParallel's buckets hold a second copy (Ray Train's ``prepare_model`` leaves
  ``gradient_as_bucket_view`` off);
* **optimizer states**: AdamW's two fp32 moments (8 bytes per trainable parameter), LARS and
  SGD one momentum (4). bf16 autocast changes none of the above (bf16 states would halve
  them; torch's AdamW keeps its states in the parameters' dtype). The fused AdamW (``fast``
  on GPU) updates in place; the foreach AdamW holds up to one fp32 copy of the trainable
  parameters while it steps, after backward has freed the activations, so that copy counts
  only where it is the larger of the two;
* **activations**: measured at a small batch (:mod:`pipelines.memory`) as a part the weights
  alone make and a part per sample, scaled to the micro-batch. With activation checkpointing:
  what stays saved (each checkpointed block's inputs and everything outside the blocks) plus
  the largest block's saves, which its recomputation holds during its backward.

The total adds the gradients to the activations although backward frees activations as it
makes gradients: an upper bound by at most the gradients. It is tensor memory (what
``torch.cuda.max_memory_allocated`` reports); the CUDA context and the caching allocator's
slack come on top of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pipelines.stage_config import StageBase

GIB = 2**30


@dataclass(frozen=True)
class PerBatch:
    """Bytes as ``fixed + per_sample * batch``."""

    fixed: float = 0.0
    per_sample: float = 0.0

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    def __add__(self, other: "PerBatch") -> "PerBatch":
        return PerBatch(self.fixed + other.fixed, self.per_sample + other.per_sample)


@dataclass(frozen=True)
class Activations:
    plain: PerBatch
    """Saved for backward without checkpointing."""
    kept: PerBatch
    """With checkpointing: what stays saved through the forward."""
    blocks: tuple[PerBatch, ...]
    """With checkpointing: what each checkpointed block saves, held while it recomputes."""

    def at(self, batch: int, checkpointing: bool) -> float:
        """Bytes at ``batch``; with checkpointing the largest block's recomputation on top of
        what stays saved (which block is largest depends on the batch: weights' bf16 copies
        do not grow with it)."""
        if not checkpointing:
            return self.plain.at(batch)
        return self.kept.at(batch) + max((block.at(batch) for block in self.blocks), default=0.0)


@dataclass
class WorkerMemory:
    """Bytes one worker of a stage holds (see the module docstring)."""

    micro_batch: int
    bf16: bool
    checkpointing: bool
    """The config's ``grad_checkpointing``."""
    weights: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    optimizer_kind: str
    step_temporaries: int
    activations: float
    """At the micro-batch, without checkpointing."""
    activations_checkpointed: float
    checkpointed_blocks: int

    def total(self, checkpointing: Optional[bool] = None) -> float:
        """Upper bound of the worker's peak, with the config's checkpointing unless given."""
        on = self.checkpointing if checkpointing is None else checkpointing
        activations = self.activations_checkpointed if on else self.activations
        static = self.weights + self.gradients + self.ddp_buckets + self.optimizer
        return static + max(activations, self.step_temporaries)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total(), "total_without_checkpointing": self.total(False),
                "total_with_checkpointing": self.total(True)}


@dataclass(frozen=True)
class ModelCosts:
    """What a model costs a worker whatever its schedule and scaling."""

    weights: int
    """Bytes of parameters and buffers."""
    trainable: int
    """Bytes of the trainable parameters, fp32."""
    activations: Activations
    bf16: bool
    largest_unit: int = 0
    """Bytes of the largest of :func:`~pipelines.stages.distributed.sharding_units` (what FSDP
    gathers whole at a time)."""

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelCosts":
        """The costs ``dataclasses.asdict`` made ``fields`` of (as ``mixmae plan`` keeps them)."""
        activations = fields["activations"]
        return cls(**{**fields, "activations": Activations(
            plain=PerBatch(**activations["plain"]), kept=PerBatch(**activations["kept"]),
            blocks=tuple(PerBatch(**block) for block in activations["blocks"]))})

    def worker(self, micro_batch: int, workers: int, optimizer: str, fused: bool, checkpointing: bool,
               sharded: bool = False) -> WorkerMemory:
        """One of ``workers`` workers training on ``micro_batch`` samples with ``optimizer``
        (adamw: two states; lars, sgd: a momentum); ``sharded`` (FSDP): weights, gradients and
        states divided among the workers, plus the largest unit gathered whole with its gradient."""
        adamw = optimizer == "adamw"
        share = workers if sharded else 1
        return WorkerMemory(
            micro_batch=micro_batch, bf16=self.bf16, checkpointing=checkpointing,
            weights=self.weights // share + (self.largest_unit if sharded else 0),
            gradients=self.trainable // share + (self.largest_unit if sharded else 0),
            ddp_buckets=self.trainable if workers > 1 and not sharded else 0,
            optimizer=self.trainable * (2 if adamw else 1) // share,
            optimizer_kind=f"{optimizer}{' fused' if adamw and fused else ''}{' sharded' if sharded else ''}",
            step_temporaries=self.trainable // share if adamw and not fused else 0,
            activations=self.activations.at(micro_batch, False),
            activations_checkpointed=self.activations.at(micro_batch, True),
            checkpointed_blocks=len(self.activations.blocks),
        )


def fast_path(spec: "StageBase") -> bool:
    """Whether the stage runs bf16 autocast and the fused AdamW (as ``LoopSpec.bf16`` and the tasks' optimizers)."""
    return spec.fast and spec.scaling.use_gpu


def worker_memory(spec: "StageBase", costs: ModelCosts) -> WorkerMemory:
    """One worker's memory for ``spec`` at its micro-batch."""
    from pipelines.stage_config import PretrainStage

    optimizer = "adamw" if isinstance(spec, PretrainStage) else spec.optimizer
    return costs.worker(spec.micro_batch(), spec.scaling.num_workers, optimizer, fast_path(spec),
                        spec.grad_checkpointing,
                        sharded=spec.scaling.parallelism == "fsdp" and spec.scaling.num_workers > 1)
