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
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from mixmae_core.checkpoint import checkpoint_info
from mixmae_core.methods import mask_spec
from mixmae_core.optim import scaled_lr
from pipelines.config import PipelineConfig
from pipelines.stage_config import (
    SYNTHETIC_PREFIX, ClassifyStage, DataSpec, DetectStage, Monitor, PretrainStage, SegmentStage, StageBase, TokenizerStage,
    TransferBase,
)
from pipelines import storage
from pipelines.data.manifest import (
    DataSource, build_manifest, open_source, pack_manifest, read_schema, shard_files, write_manifest,
)
from pipelines.data.quality import StageSkips
from pipelines.stages.jobs import DataRecipe, LoopSpec, StageError, StageJob, data_cpus

# MLflow and Ray Data are imported where a stage uses them: `mixmae plan` imports this module
# for the schedule and FLOPs, and answers while a user waits.
if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from pipelines.console import RunConsole


@dataclass
class StageContext:
    """What the pipeline hands each stage."""

    config: PipelineConfig
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage: str
    """The pipeline's storage: an absolute folder or an object store URI (:mod:`pipelines.storage`)."""
    synthetic_roots: dict[str, Path] = field(default_factory=dict)
    encoder_checkpoint: Optional[str] = None
    """The pretraining stage's ``encoder.safetensors`` (transfer stages start from it)."""
    tokenizer_checkpoint: Optional[str] = None
    """The tokenizer stage's weights (BEiT's targets), when the pipeline trained them."""
    tokenizer_flops: float = 0.0
    """What training that tokenizer cost, counted in BEiT's pretraining FLOPs."""
    console: Optional["RunConsole"] = None
    """Where a person follows the run (events, progress); None: nobody watches (tests, sweep trials)."""
    callbacks: dict[str, list] = field(default_factory=dict)
    """Extra ``ray.train.UserCallback``s per stage name (a Tune trial reports through one)."""
    skip_counter_name: Optional[str] = None
    """Name of the pipeline's :class:`~pipelines.data.quality.SkipCounter` actor."""
    stop_file: Optional[str] = None
    """Written on SIGTERM: the stages save a checkpoint and stop (see ``LoopSpec.stop_file``)."""
    keepalive: list = field(default_factory=list)
    """Driver-side handles that must outlive the stages (the named skip counter actor)."""
    beside: tuple[float, ...] = ()
    """The CPUs of each worker group of other runs beside this pipeline on the cluster (a
    sweep's other trials): the stages' decode tasks leave those to them."""

    def skips(self, run_id: str, split: str = "train") -> Optional[StageSkips]:
        """Where a stage run's decode outcomes of one split are counted (keyed by its MLflow
        run; the training split's are the ones that can stop a stage)."""
        if not self.skip_counter_name:
            return None
        return StageSkips(self.skip_counter_name, run_id if split == "train" else f"{run_id}/{split}")

    def client(self) -> "MlflowClient":
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    @property
    def local(self) -> Path:
        """This machine's folder of the storage (the tracking spool: see :func:`pipelines.storage.local_root`)."""
        return storage.local_root(self.storage)


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
    units, per_step = (train_images // 2, spec.batch_size // 2) if isinstance(spec, PretrainStage) else (train_images, spec.batch_size)
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
        options = dict(mask_ratio=spec.mask_ratio, **spec.method_options(), **spec.model_tokenizer(), **spec.model_overrides)
        report = flop_report(model, spec.img_size, method=spec.method, **options)
        return {
            "flops/encoder_gmacs": report.gflops,
            "flops/params_m": report.params_m,
            "flops/pretrain_params_m": report.pretrain_params_m,
            "flops/train_per_image": report.train_gflops_per_image * 1e9,
        }
    if isinstance(spec, TokenizerStage):
        return _tokenizer_flops(config, spec)
    task_model = transfer_model(config, name, spec, num_classes)
    if isinstance(spec, DetectStage):
        task_model = StaticDetector(task_model, spec.proposals, 0)
    macs = forward_macs(task_model, torch.rand(1, 3, spec.img_size, spec.img_size, device="meta"))
    trains_all = not (isinstance(spec, ClassifyStage) and spec.mode == "linear_probe")
    return {"flops/task_gmacs": macs / 1e9, "flops/train_per_image": 2 * macs * (3.0 if trains_all else 1.0)}


def _tokenizer_flops(config: PipelineConfig, spec: TokenizerStage) -> dict[str, float]:
    """The tokenizer stage's: forward multiply-adds and training FLOPs per image of its dVAE
    at the view BEiT tokenizes, counted on one image (its code-use metrics need real values)."""
    from mixmae_core.flops import counting, forward_macs
    from mixmae_core.tokenizer import build_tokenizer

    size = spec.view(config.stage_model(spec))
    dvae = build_tokenizer("dvae", **spec.architecture())
    image = torch.randn(1, 3, size, size)
    with counting() as counter:
        dvae(image, step=0).loss.backward()
    return {"flops/task_gmacs": forward_macs(dvae.encoder, image) / 1e9, "flops/train_per_image": counter.get_total_flops()}


def eval_every(spec: StageBase, steps: Schedule) -> Optional[int]:
    """Optimizer steps between two evaluations (None: only at the end); pretraining evaluates
    only with a monitor."""
    every = spec.eval_every_epochs if not isinstance(spec, PretrainStage) or spec.monitor else None
    return max(1, round(every * steps.steps_per_epoch)) if every else None


# ----------------------------------------------------------------------------- data


def data_path(ctx: StageContext, stage_name: str, data: DataSpec) -> str:
    """Where a stage's data lives: its root (a folder, a manifest, packed shards, or the URI of
    either of the last two), with ``synthetic:NAME`` resolved."""
    root = data.root
    if not root.startswith(SYNTHETIC_PREFIX):
        return storage.absolute(root)
    key = root[len(SYNTHETIC_PREFIX) :]
    if key not in ctx.synthetic_roots:
        raise StageError(f"stage {stage_name}: no synthetic dataset {key!r}; have {sorted(ctx.synthetic_roots)}")
    if storage.is_remote(ctx.storage):  # nodes may share no folder: the stand-ins travel through the bucket
        return _synthetic_in_storage(ctx, key, data)
    return str(Path(ctx.synthetic_roots[key]).resolve())


_packing = threading.Lock()


def _synthetic_in_storage(ctx: StageContext, key: str, data: DataSpec) -> str:
    """Synthetic stand-in ``key`` as packed shards (images included) in the storage, written
    on first use by the driver, so every node reads it. Drivers running at once (a sweep's
    trials) may each pack it, each into a folder of its own, named in ``KEY.json`` once
    complete: one object written whole, so a reader finds a complete copy or none."""
    synthetic = ctx.config.synthetic
    folder = storage.join(ctx.storage, "synthetic", f"{synthetic.scale}-seed{synthetic.seed}")
    pointer = storage.join(folder, f"{key}.json")
    with _packing, tempfile.TemporaryDirectory() as tmp:
        if storage.exists(pointer):
            return storage.join(folder, json.loads(storage.read_text(pointer))["packed"])
        packed = storage.join(folder, f"{key}-{uuid.uuid4().hex[:8]}")
        listed = build_manifest(data.layout, ctx.synthetic_roots[key], None, **data.options)
        pack_manifest(write_manifest(listed, Path(tmp) / f"{key}.parquet"), packed)
        storage.write_text(pointer, json.dumps({"packed": storage.name(packed)}))
    return packed


def resolve_source(ctx: StageContext, stage_name: str, data: DataSpec) -> DataSource:
    """A manifest for the stage's data: the given manifest / packed shards, or one listed now."""
    location = data_path(ctx, stage_name, data)
    try:
        if location.endswith(".parquet") or shard_files(location):
            source = open_source(location)
        else:
            if storage.is_remote(location):
                raise StageError(f"stage {stage_name}: {location} is neither a manifest (.parquet) nor packed shards "
                                 "(part-*.parquet); `mixmae data prepare` and `mixmae data pack` write those")
            if not Path(location).exists():
                raise StageError(f"stage {stage_name}: data root {location} does not exist")
            manifest = build_manifest(data.layout, location, None, **data.options)
            source = open_source(write_manifest(manifest, storage.join(ctx.storage, "manifests", f"{stage_name}.parquet")))
    except OSError as exc:  # a bucket that does not answer, refuses access or has no such object
        if not storage.is_remote(location) and not storage.is_remote(ctx.storage):
            raise
        raise StageError(f"stage {stage_name}: {storage.describe(location, exc)}") from None
    if source.layout != data.layout:
        raise StageError(f"stage {stage_name}: {location} holds a {source.layout} dataset, the config says {data.layout}")
    return source


def stage_inputs(ctx: StageContext, name: str, spec: StageBase, source: DataSource) -> list[StageInput]:
    """The splits ``spec`` reads, each named after its dataset and with a digest of its
    images (ids and paths): a changed dataset gets another digest in MLflow."""
    location = data_path(ctx, name, spec.data)
    synthetic = spec.data.root.startswith(SYNTHETIC_PREFIX)
    dataset = spec.data.root[len(SYNTHETIC_PREFIX):] if synthetic else storage.name(location)
    splits = [(spec.data.train_split, "training")]
    if not isinstance(spec, PretrainStage):
        splits.append((spec.data.val_split, "evaluation"))
    inputs = []
    for split, context in splits:
        table = source.table(split, ["image_id", "path"])
        digest = hashlib.sha1()
        for column in ("image_id", "path"):
            digest.update("\n".join(map(str, table.column(column).to_pylist())).encode())
        inputs.append(StageInput(split, context, f"{dataset}-{split}", location, table.num_rows, digest.hexdigest()[:12]))
    return inputs


def monitor_source(ctx: StageContext, monitor: Monitor) -> DataSource:
    """The k-NN monitor's data: its train and validation splits, each cut to ``max_images``
    by a fixed random subset (not the run's seed: every run is scored on the same images)."""
    source = resolve_source(ctx, "pretrain_monitor", monitor.data)
    splits = (monitor.data.train_split, monitor.data.val_split)
    for split in splits:
        split_size(source, split, "pretrain (its monitor)")
    if monitor.max_images is None:
        return source
    parts = []
    for split in splits:
        rows = source.table(split)
        keep = np.sort(np.random.default_rng(0).permutation(rows.num_rows)[: monitor.max_images])
        parts.append(rows.take(keep))
    subset = pa.concat_tables(parts).replace_schema_metadata(read_schema(source.files[0]).metadata)
    return open_source(write_manifest(subset, storage.join(ctx.storage, "manifests", "pretrain_monitor_subset.parquet")))


def split_size(source: DataSource, split: str, stage_name: str) -> int:
    n = source.table(split, ["image_id"]).num_rows
    if n == 0:
        raise StageError(f"stage {stage_name}: split {split!r} of {source.files[0]} is empty")
    return n


#: the ``init`` tag of a stage whose encoder its worker group's pretraining has yet to export
#: (the driver replaces it with the encoder's location once the stage has trained)
PENDING_ENCODER = "the encoder of this worker group's pretraining"


def trainer_name(ctx: StageContext, group: str) -> str:
    """The Ray Train run of a worker group: stable across reruns of the pipeline, so a rerun resumes it."""
    return f"{ctx.parent_run_id}-{group}"


def encoder_method(ctx: StageContext, spec: StageBase, weights: Optional[str]) -> str:
    """How the stage's encoder was pretrained: its method, ``none`` (random), or what an
    ``init`` checkpoint says (``unknown`` when it does not say)."""
    if not isinstance(spec, TransferBase) or spec.init == "pretrained":
        return ctx.config.pretrain.method
    return "none" if weights is None else checkpoint_info(storage.local_copy(weights)).get("method", "unknown")


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
    location = storage.absolute(spec.init)
    if not storage.exists(location):
        raise StageError(f"stage {name}: init checkpoint {location} does not exist")
    return location


def _recipes(
    ctx: StageContext, spec: StageBase, source: DataSource, skips: dict[str, Optional[StageSkips]]
) -> dict[str, DataRecipe]:
    """How the stage's workers build their datasets (each its own shard, epoch by epoch)."""
    data = spec.data
    common = dict(img_size=spec.img_size, seed=spec.seed)
    if isinstance(spec, PretrainStage):
        masks = mask_spec(spec.method, spec.model, img_size=spec.img_size, mask_ratio=spec.mask_ratio,
                          **spec.method_options(), **spec.model_tokenizer(), **spec.model_overrides)
        arguments = dict(split=data.train_split, masks=masks, scale=spec.crop_scale, hflip=spec.hflip)
        recipes = {"train": DataRecipe("pretrain", source, {**arguments, **common, "skips": skips["train"]})}
        if spec.monitor is not None:
            monitor, labelled = spec.monitor, monitor_source(ctx, spec.monitor)
            for name, split in (("monitor_train", monitor.data.train_split), ("monitor_val", monitor.data.val_split)):
                recipes[name] = DataRecipe("classify", labelled, dict(
                    split=split, train=False, img_size=spec.img_size, crop_pct=monitor.crop_pct, auto_augment=None))
        return recipes
    if isinstance(spec, TokenizerStage):
        arguments = dict(split=data.train_split, train=True, auto_augment=None, scale=spec.crop_scale, hflip=spec.hflip)
        return {"train": DataRecipe("classify", source, {**arguments, **common, "skips": skips["train"]})}
    augment: dict[str, Any] = {}
    if isinstance(spec, ClassifyStage):
        probe = spec.mode == "linear_probe"
        augment = dict(auto_augment=None if probe else spec.auto_augment, crop_pct=spec.crop_pct,
                       scale=spec.crop_scale, hflip=spec.hflip)
    return {
        name: DataRecipe(spec.task, source, dict(split=split, train=name == "train", skips=skips[name], **augment, **common))
        for name, split in (("train", data.train_split), ("val", data.val_split))
    }


# ----------------------------------------------------------------------------- the stage


def prepare_stage(
    ctx: StageContext, name: str, run_id: str, earlier: Sequence[str] = (), beside: Sequence[float] = ()
) -> PreparedStage:
    """Everything a stage needs before its workers start; ``earlier``: the stages before it in
    its worker group that have yet to train (a transfer stage after the pretraining starts from
    the encoder that stage exports, which its workers find); ``beside``: the CPUs of each of the
    pipeline's worker groups that may run beside this stage's."""
    spec = ctx.config.all_stages()[name]
    source = resolve_source(ctx, name, spec.data)
    images = split_size(source, spec.data.train_split, name)
    steps = schedule(name, spec, images)
    tags = {"data": str(source.files[0])}
    job_fields: dict[str, Any] = {}
    weights = val_images = None
    flops_before = 0.0
    num_classes = 0
    if isinstance(spec, PretrainStage):
        tags.update(mask_ratio=str(spec.mask_ratio), mask_mode=spec.mask_mode)
        if spec.method == "beit":
            tokenizer = ctx.tokenizer_checkpoint or spec.model_tokenizer()["tokenizer"]
            if not isinstance(tokenizer, str):
                raise StageError("stage pretrain (BEiT) needs its tokenizer, but this pipeline has no finished "
                                 "tokenizer stage; run it first (`mixmae pretrain` does), or give a tokenizer file")
            job_fields["tokenizer_weights"], flops_before = tokenizer, ctx.tokenizer_flops
            tags["tokenizer"] = tokenizer
    elif isinstance(spec, TransferBase):
        val_images = split_size(source, spec.data.val_split, name)
        follows = spec.init == "pretrained" and "pretrain" in earlier
        weights = None if follows else encoder_source(ctx, name, spec)
        num_classes = spec.num_classes if isinstance(spec, SegmentStage) else source.num_classes
        job_fields.update(encoder_weights=weights, weights_from="pretrain" if follows else None,
                          class_names=tuple(source.classes))
        if isinstance(spec, DetectStage):
            from pipelines.data.datasets import coco_ground_truth

            job_fields["coco_gt"] = ray.put(coco_ground_truth(source, split=spec.data.val_split, img_size=spec.img_size))
        tags.update(init=weights or (PENDING_ENCODER if follows else "random"), task=spec.task)
    tags.update(method=encoder_method(ctx, spec, weights), encoder=ctx.config.stage_model(spec))
    flops = stage_flops(ctx.config, name, spec, num_classes)
    loop = LoopSpec(
        tracking_uri=ctx.tracking_uri,
        run_id=run_id,
        steps_per_epoch=steps.steps_per_epoch,
        total_steps=steps.total_steps,
        warmup_steps=steps.warmup_steps,
        lr=scaled_lr(spec.base_lr, spec.batch_size),
        log_every=min(spec.log_every_steps, steps.total_steps),
        eval_every=eval_every(spec, steps),
        train_flops_per_image=flops["flops/train_per_image"],
        flops_before=flops_before,
        skips=ctx.skips(run_id),
        bf16=spec.fast and spec.scaling.use_gpu,
        system_metrics_every_s=ctx.config.tracking.system_metrics_every_s if ctx.config.tracking.system_metrics else None,
        storage=ctx.storage,
        stop_file=ctx.stop_file or "",
        driver_node=ray.get_runtime_context().get_node_id(),
        delivery_wait_s=ctx.config.tracking.delivery_wait_s,
        data_cpus=data_cpus(ray.cluster_resources().get("CPU", 1.0), spec.scaling, [*ctx.beside, *beside]),
    )
    data = _recipes(ctx, spec, source, {"train": ctx.skips(run_id), "val": ctx.skips(run_id, "val")})
    job = StageJob(name, spec, ctx.config.stage_model(spec), num_classes=num_classes, loop=loop, data=data, **job_fields)
    return PreparedStage(
        job=job,
        flops={**flops, "data/train_images": images, **({"data/val_images": val_images} if val_images else {})},
        tags=tags,
        inputs=stage_inputs(ctx, name, spec, source),
    )
