"""Driver side of a stage before it trains: its data, datasets, schedule, FLOPs, and the
:class:`~pipelines.stages.jobs.StageJob` its workers run.

``mixmae plan`` prices a config with the same functions (:func:`schedule`,
:func:`stage_flops`), so the bill and the stage agree on steps and FLOPs, and refuse the
same impossible configs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import ray
import torch
from mlflow.tracking import MlflowClient

from mixmae_core.checkpoint import checkpoint_info
from mixmae_core.optim import scaled_lr
from pipelines.config import (
    SYNTHETIC_PREFIX,
    ClassifyStage,
    DataSpec,
    DetectStage,
    PipelineConfig,
    PretrainStage,
    SegmentStage,
    StageBase,
    TransferBase,
)
from pipelines.data.datasets import (
    classification_dataset,
    coco_ground_truth,
    detection_dataset,
    pretrain_dataset,
    segmentation_dataset,
)
from pipelines.data.manifest import DataSource, build_manifest, open_source, write_manifest
from pipelines.data.quality import StageSkips
from pipelines.stages.jobs import LoopSpec, StageError, StageJob
from pipelines.stages.checkpoints import newest_in

if TYPE_CHECKING:
    from pipelines.console import RunConsole


@dataclass
class StageContext:
    """What the pipeline hands each stage."""

    config: PipelineConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage: Path
    synthetic_roots: dict[str, Path] = field(default_factory=dict)
    encoder_checkpoint: Optional[str] = None
    """The pretraining stage's ``encoder.safetensors`` (transfer stages start from it)."""
    console: Optional["RunConsole"] = None
    """Where a person follows the run (events, progress); None: nobody watches (tests, sweep trials)."""
    callbacks: dict[str, list] = field(default_factory=dict)
    """Extra ``ray.train.UserCallback``s per stage name (a Tune trial reports through one)."""
    skip_counter_name: Optional[str] = None
    """Name of the pipeline's :class:`~pipelines.data.quality.SkipCounter` actor."""
    stop_file: Optional[Path] = None
    """Written on SIGTERM: the stages save a checkpoint and stop (see ``LoopSpec.stop_file``)."""
    keepalive: list = field(default_factory=list)
    """Driver-side handles that must outlive the stages (the named skip counter actor)."""

    def skips(self, run_id: str, split: str = "train") -> Optional[StageSkips]:
        """Where a stage run's decode outcomes of one split are counted (keyed by its MLflow
        run; the training split's are the ones that can stop a stage)."""
        if not self.skip_counter_name:
            return None
        return StageSkips(self.skip_counter_name, run_id if split == "train" else f"{run_id}/{split}")

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


@dataclass(frozen=True)
class StageInput:
    """A split a stage reads, as MLflow's run page lists it."""

    split: str
    context: str
    """``training`` or ``evaluation``."""
    name: str
    source: str
    num_images: int
    digest: str


@dataclass
class PreparedStage:
    job: StageJob
    datasets: dict[str, "ray.data.Dataset"]
    split: list[str]
    """Training datasets: split equally, so every rank runs the same number of steps."""
    evaluation: list[str]
    """Evaluation datasets: split unequally, so every image is scored exactly once."""
    flops: dict[str, float]
    """FLOPs and sizes, logged as the stage run's metrics at step 0."""
    tags: dict[str, str]
    inputs: list[StageInput] = field(default_factory=list)


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


# ----------------------------------------------------------------------------- what `mixmae plan` shares


def schedule(name: str, spec: StageBase, train_images: int) -> Schedule:
    """Optimizer steps of a stage on ``train_images`` images. Pretraining steps over pairs;
    a dataset smaller than one global batch is refused."""
    units, per_step = (train_images // 2, spec.batch_size // 2) if spec.task == "pretrain" else (train_images, spec.batch_size)
    per_epoch = units // per_step
    if per_epoch < 1:
        raise StageError(
            f"stage {name}: {units} training samples do not fill one global batch of {per_step}; lower batch_size"
        )
    total = max(1, math.ceil(spec.epochs * per_epoch))
    if spec.max_steps:
        total = min(total, spec.max_steps)
    warmup = min(int(round(spec.warmup_epochs * per_epoch)), max(total - 1, 0))
    return Schedule(per_epoch, total, warmup)


def stage_flops(config: PipelineConfig, name: str, spec: StageBase, num_classes: int) -> dict[str, float]:
    """What a stage logs under ``flops/``: the model's forward multiply-adds at its input size
    (``encoder_gmacs`` for pretraining, encoder + 1000-class head as the paper counts;
    ``task_gmacs`` for the task model) and ``train_per_image``, true FLOPs of one training
    step per image (for pretraining the method's forward + backward as it runs, measured; for
    transfer 2 FLOPs per MAC, times 3 where the whole model trains and 1 for a linear probe).

    Counted on the meta device (shapes only). A detector's forward is its backbone, RPN head
    and box head on its ``proposals`` RoIs; the mask head runs on the detections its score
    threshold keeps at run time and is left out."""
    from mixmae_core.flops import flop_report, forward_macs
    from pipelines.memory import StaticDetector, transfer_model

    model = config.stage_model(spec)
    if isinstance(spec, PretrainStage):
        report = flop_report(model, spec.img_size, method=spec.method, **spec.model_overrides)
        return {
            "flops/encoder_gmacs": report.gflops,
            "flops/params_m": report.params_m,
            "flops/pretrain_params_m": report.pretrain_params_m,
            "flops/train_per_image": report.train_gflops_per_image * 1e9,
        }
    task_model = transfer_model(config, name, spec, num_classes)
    if isinstance(spec, DetectStage):
        task_model = StaticDetector(task_model, spec.proposals, 0)
    macs = forward_macs(task_model, torch.rand(1, 3, spec.img_size, spec.img_size, device="meta"))
    trains_all = not (isinstance(spec, ClassifyStage) and spec.mode == "linear_probe")
    return {"flops/task_gmacs": macs / 1e9, "flops/train_per_image": 2 * macs * (3.0 if trains_all else 1.0)}


# ----------------------------------------------------------------------------- data


def data_path(ctx: StageContext, stage_name: str, data: DataSpec) -> Path:
    """Where a stage's data lives: its root, with ``synthetic:NAME`` resolved."""
    root = data.root
    if root.startswith(SYNTHETIC_PREFIX):
        key = root[len(SYNTHETIC_PREFIX) :]
        if key not in ctx.synthetic_roots:
            raise StageError(f"stage {stage_name}: no synthetic dataset {key!r}; have {sorted(ctx.synthetic_roots)}")
        root = str(ctx.synthetic_roots[key])
    return Path(root).expanduser().resolve()


def resolve_source(ctx: StageContext, stage_name: str, data: DataSpec) -> DataSource:
    """A manifest for the stage's data: the given manifest / packed shards, or one listed now."""
    path = data_path(ctx, stage_name, data)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("part-*.parquet"))):
        source = open_source(path)
    else:
        if not path.exists():
            raise StageError(f"stage {stage_name}: data root {path} does not exist")
        manifest = build_manifest(data.layout, path, None, **data.options)
        source = open_source(write_manifest(manifest, ctx.storage / "manifests" / f"{stage_name}.parquet"))
    if source.layout != data.layout:
        raise StageError(f"stage {stage_name}: {path} holds a {source.layout} dataset, the config says {data.layout}")
    return source


def stage_inputs(ctx: StageContext, name: str, spec: StageBase, source: DataSource) -> list[StageInput]:
    """The splits ``spec`` reads, each named after its dataset and with a digest of its
    images (ids and paths): a changed dataset gets another digest in MLflow."""
    path = data_path(ctx, name, spec.data)
    dataset = path.name if not spec.data.root.startswith(SYNTHETIC_PREFIX) else spec.data.root[len(SYNTHETIC_PREFIX):]
    splits = [(spec.data.train_split, "training")]
    if not isinstance(spec, PretrainStage):
        splits.append((spec.data.val_split, "evaluation"))
    inputs = []
    for split, context in splits:
        table = source.table(split, ["image_id", "path"])
        digest = hashlib.sha1()
        for column in ("image_id", "path"):
            digest.update("\n".join(map(str, table.column(column).to_pylist())).encode())
        inputs.append(StageInput(split, context, f"{dataset}-{split}", str(path), table.num_rows, digest.hexdigest()[:12]))
    return inputs


def split_size(source: DataSource, split: str, stage_name: str) -> int:
    n = source.table(split, ["image_id"]).num_rows
    if n == 0:
        raise StageError(f"stage {stage_name}: split {split!r} of {source.files[0]} is empty")
    return n


def trainer_name(ctx: StageContext, group: str) -> str:
    """The Ray Train run of a worker group: stable across reruns of the pipeline, so a rerun resumes it."""
    return f"{ctx.parent_run_id}-{group}"


def resume_epoch(ctx: StageContext, stage_name: str) -> int:
    """The epoch the checkpoint this stage resumes from stopped in (0 without one), so that a
    resumed run's data continues with that epoch's order and pairing."""
    found = newest_in(ctx.storage / trainer_name(ctx, ctx.config.group_name(stage_name)))
    return int(found.meta.get("epoch", 0)) if found and found.meta.get("stage") == stage_name else 0


def encoder_method(ctx: StageContext, spec: StageBase, weights: Optional[str]) -> str:
    """How the stage's encoder was pretrained: its method, ``none`` (random), or what an
    ``init`` checkpoint says (``unknown`` when it does not say)."""
    if isinstance(spec, PretrainStage) or spec.init == "pretrained":
        return ctx.config.pretrain.method
    return "none" if weights is None else checkpoint_info(weights).get("method", "unknown")


def encoder_source(ctx: StageContext, name: str, spec: TransferBase) -> Optional[str]:
    """Which encoder weights a transfer stage starts from (None: random init)."""
    if spec.init == "random":
        return None
    if spec.init == "pretrained":
        if not ctx.encoder_checkpoint:
            raise StageError(
                f"stage {name} starts from the pretrained encoder, but this pipeline has no finished "
                "pretraining stage; run it first, or set init: random or init: <checkpoint path>"
            )
        return ctx.encoder_checkpoint
    path = Path(spec.init).expanduser().resolve()
    if not path.exists():
        raise StageError(f"stage {name}: init checkpoint {path} does not exist")
    return str(path)


def _datasets(spec: StageBase, source: DataSource, epoch: int, skips: dict[str, Optional[StageSkips]]) -> dict[str, Any]:
    data = spec.data
    common = dict(img_size=spec.img_size, seed=spec.seed)
    if isinstance(spec, PretrainStage):
        return {
            "train": pretrain_dataset(
                source, split=data.train_split, mask_ratio=spec.mask_ratio, epoch=epoch, scale=spec.crop_scale,
                hflip=spec.hflip, skips=skips["train"], **common,
            )
        }
    if isinstance(spec, ClassifyStage):
        probe = spec.mode == "linear_probe"
        augment = dict(
            auto_augment=None if probe else spec.auto_augment, crop_pct=spec.crop_pct, scale=spec.crop_scale,
            hflip=spec.hflip,
        )
        build = classification_dataset
    elif isinstance(spec, DetectStage):
        augment, build = {}, detection_dataset
    elif isinstance(spec, SegmentStage):
        augment, build = {}, segmentation_dataset
    else:  # pragma: no cover - the config schema admits only these
        raise StageError(f"unknown task {spec.task}")
    return {
        "train": build(source, split=data.train_split, train=True, epoch=epoch, skips=skips["train"], **augment, **common),
        "val": build(source, split=data.val_split, train=False, skips=skips["val"], **augment, **common),
    }


# ----------------------------------------------------------------------------- the stage


def prepare_stage(ctx: StageContext, name: str, run_id: str) -> PreparedStage:
    """Everything a stage needs before its workers start."""
    spec = ctx.config.all_stages()[name]
    source = resolve_source(ctx, name, spec.data)
    images = split_size(source, spec.data.train_split, name)
    steps = schedule(name, spec, images)
    tags = {"data": str(source.files[0])}
    job_fields: dict[str, Any] = {}
    weights = val_images = None
    if isinstance(spec, PretrainStage):
        tags.update(mask_ratio=str(spec.mask_ratio), mask_mode=spec.mask_mode)
        num_classes = 0
    else:
        val_images = split_size(source, spec.data.val_split, name)
        weights = encoder_source(ctx, name, spec)
        num_classes = spec.num_classes if isinstance(spec, SegmentStage) else source.num_classes
        job_fields.update(encoder_weights=weights, class_names=tuple(source.classes))
        if isinstance(spec, DetectStage):
            job_fields["coco_gt"] = ray.put(coco_ground_truth(source, split=spec.data.val_split, img_size=spec.img_size))
        tags.update(init=weights or "random", task=spec.task)
    tags.update(method=encoder_method(ctx, spec, weights), encoder=ctx.config.stage_model(spec))
    flops = stage_flops(ctx.config, name, spec, num_classes)
    loop = LoopSpec(
        stage=name,
        tracking_uri=ctx.tracking_uri,
        run_id=run_id,
        steps_per_epoch=steps.steps_per_epoch,
        total_steps=steps.total_steps,
        warmup_steps=steps.warmup_steps,
        lr=scaled_lr(spec.base_lr, spec.batch_size),
        min_lr=spec.min_lr,
        accum_steps=spec.accum_steps,
        clip_grad=spec.clip_grad,
        log_every=min(spec.log_every_steps, steps.total_steps),
        checkpoint_every=spec.checkpoint_every_steps,
        eval_every=None if isinstance(spec, PretrainStage) else max(1, round(spec.eval_every_epochs * steps.steps_per_epoch)),
        seed=spec.seed,
        train_flops_per_image=flops["flops/train_per_image"],
        skips=ctx.skips(run_id),
        max_skip_fraction=spec.data.max_skip_fraction,
        bf16=spec.fast and spec.scaling.use_gpu,
        system_metrics_every_s=ctx.config.tracking.system_metrics_every_s if ctx.config.tracking.system_metrics else None,
        storage=str(ctx.storage),
        stop_file=str(ctx.stop_file or ""),
    )
    job = StageJob(name, spec, ctx.config.stage_model(spec), num_classes=num_classes, loop=loop, **job_fields)
    return PreparedStage(
        job=job,
        datasets=_datasets(
            spec, source, resume_epoch(ctx, name), {"train": ctx.skips(run_id), "val": ctx.skips(run_id, "val")}
        ),
        split=["train"],
        evaluation=[] if isinstance(spec, PretrainStage) else ["val"],
        flops={**flops, "data/train_images": images, **({"data/val_images": val_images} if val_images else {})},
        tags=tags,
        inputs=stage_inputs(ctx, name, spec, source),
    )
