"""Driver side of a stage: one MLflow run, one Ray Train ``TorchTrainer``, resumable.

Every stage is ``run_stage(ctx, name, spec, plan)``: the stage module decides the model,
data and FLOPs (a :class:`StagePlan`), this module does the rest the same way for all:
find or create the stage's MLflow run (a finished stage is skipped), log the resolved
config, start the trainer under a name derived from the pipeline run (so re-running
resumes from its checkpoints), show progress, and record the outcome.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import ray.train
import yaml
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines.config import SYNTHETIC_PREFIX, DataSpec, PipelineConfig, PretrainStage, StageBase
from pipelines.data.manifest import DataSource, build_manifest, open_source, write_manifest
from pipelines.stages.ingest import StageDataConfig
from pipelines.stages.loop import ENCODER_FILE, LOSS_METRIC, META_FILE, LoopSpec
from pipelines.tracking import COMPLETE, ENCODER, FAILED_REASON, KIND, STAGE, RunLogger, flatten, start_or_resume


class StageError(RuntimeError):
    """A stage failed; the message says why and where its last checkpoint is."""


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
    """The previous stage's ``encoder.safetensors`` (transfer stages start from it)."""
    progress: Optional[Progress] = None
    """A shared live display: each running stage adds its own bar."""
    callbacks: dict[str, list] = field(default_factory=dict)
    """Extra ``ray.train.UserCallback``s per stage name (a Tune trial reports through one)."""

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


@dataclass
class StageOutcome:
    name: str
    run_id: str
    metrics: dict[str, float]
    checkpoint: Optional[str]
    encoder_checkpoint: Optional[str]
    skipped: bool = False


@dataclass
class StagePlan:
    """What a stage module decides before training."""

    train_fn: Callable[[dict], None]
    worker_config: dict[str, Any]
    datasets: dict[str, "ray.data.Dataset"]
    split: list[str]
    """Training datasets: split equally, so every rank runs the same number of steps."""
    steps_per_epoch: int
    flops: dict[str, float]
    tags: dict[str, str]
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    skip_counter: Optional[str] = None
    evaluation: list[str] = field(default_factory=list)
    """Evaluation datasets: split unequally, so every image is scored exactly once."""
    keepalive: Any = None
    """Driver-side handles that must outlive the trainer (e.g. the named skip counter actor)."""


def resolve_source(ctx: StageContext, stage_name: str, data: DataSpec) -> DataSource:
    """A manifest for the stage's data: the given manifest / packed shards, or one listed now."""
    root = data.root
    if root.startswith(SYNTHETIC_PREFIX):
        key = root[len(SYNTHETIC_PREFIX) :]
        if key not in ctx.synthetic_roots:
            raise StageError(f"stage {stage_name}: no synthetic dataset {key!r}; have {sorted(ctx.synthetic_roots)}")
        root = str(ctx.synthetic_roots[key])
    path = Path(root).expanduser().resolve()
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


def trainer_name(ctx: StageContext, stage_name: str) -> str:
    return f"{ctx.parent_run_id}-{stage_name}"


def resume_epoch(ctx: StageContext, stage_name: str) -> int:
    """The epoch the newest checkpoint of this stage stopped in (0 without one), so that a
    resumed run's data continues with that epoch's order and pairing."""
    newest: dict[str, Any] = {}
    for meta in (ctx.storage / trainer_name(ctx, stage_name)).glob(f"checkpoint_*/{META_FILE}"):
        info = json.loads(meta.read_text())
        if info.get("step", -1) > newest.get("step", -1):
            newest = info
    return int(newest.get("epoch", 0))


def split_size(source: DataSource, split: str, stage_name: str) -> int:
    n = source.table(split, ["image_id"]).num_rows
    if n == 0:
        raise StageError(f"stage {stage_name}: split {split!r} of {source.files[0]} is empty")
    return n


def stage_tags(config: PipelineConfig, name: str, spec: StageBase) -> dict[str, str]:
    tags = {
        KIND: "stage",
        STAGE: name,
        "model": config.stage_model(spec),
        "epochs": str(spec.epochs),
        "workers": str(spec.scaling.num_workers),
        "device": "gpu" if spec.scaling.use_gpu else "cpu",
    }
    if isinstance(spec, PretrainStage):
        tags["mask_ratio"] = str(spec.mask_ratio)
    return tags


def progress_display() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<11}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _monitor(client: MlflowClient, run_id: str, name: str, total: int, progress: Progress, stop: threading.Event) -> None:
    """Follow the stage's metrics in MLflow (what rank 0 logged) on the driver's display."""
    task = progress.add_task(name, total=total, info="starting workers")
    while not stop.wait(2.0):
        try:
            history = client.get_metric_history(run_id, LOSS_METRIC)
            latest = client.get_run(run_id).data.metrics
        except Exception:  # the store may be busy; the next poll retries
            continue
        if history:
            info = f"loss {history[-1].value:.4f}  {latest.get('train/images_per_s', 0):.1f} img/s"
            progress.update(task, completed=history[-1].step, info=info)
    progress.update(task, completed=total, info="done")


def run_stage(ctx: StageContext, name: str, spec: StageBase, plan_fn: Callable[[StageContext, str, str], StagePlan]) -> StageOutcome:
    """Run (or resume, or skip if finished) stage ``name``; ``plan_fn(ctx, name, run_id)`` plans it."""
    client = ctx.client()
    config = ctx.config
    tags = stage_tags(config, name, spec)
    run = start_or_resume(client, ctx.experiment_id, name, {KIND: "stage", STAGE: name}, parent_id=ctx.parent_run_id)
    run_id = run.info.run_id
    if run.data.tags.get(COMPLETE) == "true":
        client.set_terminated(run_id, "FINISHED")
        return StageOutcome(name, run_id, dict(run.data.metrics), run.data.tags.get("mixmae.checkpoint"),
                            run.data.tags.get(ENCODER), skipped=True)
    logger = RunLogger(ctx.tracking_uri, run_id)
    plan = plan_fn(ctx, name, run_id)
    logger.params(flatten("", spec.model_dump(mode="json")))
    logger.tags({**tags, **plan.tags})
    logger.metrics(plan.flops, 0)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump({"stage": name, **spec.model_dump(mode="json")}, sort_keys=False))
        logger.artifact(resolved)

    from pipelines.stages.loop import lr_steps

    total, warmup = lr_steps(spec.epochs, plan.steps_per_epoch, spec.warmup_epochs, spec.max_steps)
    loop = LoopSpec(
        stage=name,
        tracking_uri=ctx.tracking_uri,
        run_id=run_id,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        lr=spec.base_lr * spec.batch_size / 256,
        min_lr=spec.min_lr,
        accum_steps=spec.accum_steps,
        clip_grad=spec.clip_grad,
        log_every=min(spec.log_every_steps, total),
        checkpoint_every=spec.checkpoint_every_steps,
        seed=spec.seed,
        train_flops_per_image=plan.flops.get("flops/train_per_image", 0.0),
        skip_counter=plan.skip_counter,
        max_skip_fraction=spec.data.max_skip_fraction,
        bf16=spec.fast and spec.scaling.use_gpu,
    )
    for key, value in plan.spec_overrides.items():
        setattr(loop, key, value)
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    trainer = TorchTrainer(
        plan.train_fn,
        train_loop_config={"loop": asdict(loop), **plan.worker_config},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=trainer_name(ctx, name),
            storage_path=str(ctx.storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            callbacks=ctx.callbacks.get(name, []),
        ),
        datasets=plan.datasets,
        dataset_config=StageDataConfig(plan.split, plan.evaluation),
    )
    stop = threading.Event()
    monitor = None
    if ctx.progress is not None:
        monitor = threading.Thread(target=_monitor, args=(client, run_id, name, total, ctx.progress, stop), daemon=True)
        monitor.start()
    started = time.time()
    if FAILED_REASON in run.data.tags:  # a resumed run starts with a clean slate
        client.delete_tag(run_id, FAILED_REASON)
    try:
        result = trainer.fit()
    except Exception as exc:
        reason = client.get_run(run_id).data.tags.get(FAILED_REASON) or f"{type(exc).__name__}: {exc}"
        client.set_tag(run_id, FAILED_REASON, reason[:5000])
        client.set_terminated(run_id, "FAILED")
        raise StageError(f"stage {name} failed: {reason}") from exc
    finally:
        stop.set()
        if monitor:
            monitor.join()
    stopped = client.get_run(run_id).data.tags.get(FAILED_REASON)
    if stopped:
        client.set_terminated(run_id, "FAILED")
        raise StageError(stopped)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    encoder = str(Path(checkpoint) / ENCODER_FILE) if checkpoint else None
    wall = time.time() - started
    logger.metrics({"time/wall_s": wall}, total)
    if checkpoint:
        logger.artifacts([Path(checkpoint) / f for f in sorted(p.name for p in Path(checkpoint).iterdir())], "checkpoint")
    logger.tags({COMPLETE: "true", "mixmae.checkpoint": checkpoint or "", ENCODER: encoder or "", "mixmae.meta": META_FILE})
    client.set_terminated(run_id, "FINISHED")
    metrics = dict(client.get_run(run_id).data.metrics)
    return StageOutcome(name, run_id, metrics, checkpoint, encoder)


def steps_per_epoch(units: int, units_per_step: int, stage_name: str) -> int:
    steps = units // units_per_step
    if steps < 1:
        raise StageError(
            f"stage {stage_name}: {units} training samples do not fill one global batch of {units_per_step}; "
            "lower batch_size"
        )
    return steps
