"""What the driver sends each Ray Train worker: typed, picklable, and light to import.

Ray Train's controller unpickles the train loop's config in every run, so this module
(and what it imports: the config schema, the skip-count handle) must not pull in torch,
timm or MLflow; the worker modules that use the settings import those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from pipelines.stage_config import ClassifyStage, DetectStage, PretrainStage, SegmentStage, TokenizerStage
from pipelines.data.manifest import DataSource
from pipelines.data.quality import StageSkips

if TYPE_CHECKING:
    import ray.data

    from pipelines.data.order import Shard

StageSpec = Union[TokenizerStage, PretrainStage, ClassifyStage, DetectStage, SegmentStage]
HEADLINE = {"tokenizer": "train/recon_mse", "pretrain": "train/loss", "classify": "val/top1", "detect": "val/bbox_AP",
            "segment": "val/mIoU"}
"""Each task's headline metric: the summary table's and the pipeline run's, and (evaluations) the one whose best is kept."""


class StageError(RuntimeError):
    """A stage cannot run or failed; the message says why (and where its last checkpoint is)."""


class Preempted(StageError):
    """The run was asked to stop (SIGTERM) and its stages saved checkpoints; the same command continues it."""


class TrackingAway(StageError):
    """Training is done and saved, but the tracking server did not take its records: they
    wait in the spool (and nothing more can be told to the server now)."""


@dataclass(frozen=True)
class LoopSpec:
    """What the shared training loop needs beyond the stage's config: what the driver derived
    from it (schedule, scaled lr, FLOPs) and where the stage reports."""

    tracking_uri: str
    run_id: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    """Peak learning rate (``base_lr`` scaled by the global batch)."""
    log_every: int = 10
    eval_every: Optional[int] = None
    """Optimizer steps between evaluations (None: only at the end)."""
    train_flops_per_image: float = 0.0
    flops_before: float = 0.0
    """FLOPs spent before the stage that count in its own (BEiT's: training its tokenizer)."""
    skips: Optional[StageSkips] = None
    bf16: bool = False
    system_metrics_every_s: Optional[float] = 10.0
    """Seconds between two samples of each node's system metrics (None: none)."""
    storage: str = ""
    """The pipeline's storage (a folder or a bucket): checkpoints; when a folder, the spool of what goes to MLflow."""
    stop_file: str = ""
    """While this file (or object) exists the workers save a checkpoint at the next step and stop (SIGTERM to the driver)."""
    driver_node: str = ""
    """The Ray node of the driver: with storage in a bucket, only spools on its disk are left to it to deliver."""
    delivery_wait_s: float = 120.0
    """How long a worker whose spool the driver cannot read waits for the tracking server before it ends."""
    data_cpus: Optional[float] = None
    """The CPUs each worker's decode tasks may plan with (:func:`data_cpus`; None only for a
    stage that reads no dataset)."""


#: The least CPU a worker's decode tasks plan with when the workers take (nearly) all of them.
MIN_DATA_CPUS = 0.1


def data_cpus(cluster_cpus: float, scaling: Any, beside: Sequence[float] = ()) -> float:
    """The CPUs one worker's decode tasks may plan with: the cluster's, less the stage's
    workers' own and those of the worker groups running ``beside`` it (one entry of CPUs each:
    the pipeline's other groups, a sweep's other trials), shared equally among the groups, then
    among the stage's workers (each executes its own dataset). Planning with the CPUs another
    group's decode tasks hold queues a worker's tasks behind that group's epoch."""
    spare = cluster_cpus - scaling.cpus - sum(beside)
    return max(MIN_DATA_CPUS, spare / (1 + len(beside)) / scaling.num_workers)


@dataclass(frozen=True)
class DataRecipe:
    """How a worker builds one of its stage's datasets, shard by shard: the builder
    (:func:`pipelines.data.datasets.build_dataset`'s kind), the source, and its other arguments."""

    kind: str
    source: DataSource
    arguments: dict[str, Any] = field(default_factory=dict)

    def build(self, shard: "Shard", cpus: Optional[float] = None) -> "ray.data.Dataset":
        from pipelines.data.datasets import build_dataset

        return build_dataset(self.kind, self.source, shard=shard, cpus=cpus, **self.arguments)


@dataclass(frozen=True)
class StageJob:
    """One stage as its workers run it: the stage's validated config section, the loop
    settings, and what the driver resolved (encoder variant and weights, classes)."""

    name: str
    spec: StageSpec
    model: str
    """The encoder variant (the stage's own, else the pretraining stage's)."""
    encoder_weights: Optional[str] = None
    """Checkpoint the encoder starts from (None: random initialisation)."""
    weights_from: Optional[str] = None
    """The earlier stage of the same worker group whose exported encoder this one starts from
    (its location is known only once that stage has finished, in the workers)."""
    tokenizer_weights: Optional[str] = None
    """BEiT's frozen tokenizer (a file of ``mixmae_core.tokenizer.save_tokenizer``)."""
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    coco_gt: Any = None
    """Detection: Ray object reference to the validation split's COCO ground truth."""
    loop: Optional[LoopSpec] = None
    """None only for a job built to be measured (``stage_flops``), never trained."""
    data: dict[str, DataRecipe] = field(default_factory=dict)
    """The stage's datasets by name (``train``; ``val`` for transfer stages)."""

    @property
    def task(self) -> str:
        return self.spec.task
