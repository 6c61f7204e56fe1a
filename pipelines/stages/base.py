"""Driver side of stages: one MLflow run per stage, one Ray Train ``TorchTrainer`` per
worker group of stages (usually a stage alone), resumable.

``run_worker_group(ctx, group, names, planners)`` runs stages the same way for all: the
stage module decides the model, data and FLOPs (a :class:`StagePlan`); this module finds
or creates each stage's MLflow run (a finished stage is skipped), logs the resolved config,
starts the trainer under a name derived from the pipeline run (so re-running resumes from
its checkpoints) and shows progress. The workers record each stage's completion.
"""

from __future__ import annotations

import json
import tempfile
import threading
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
from pipelines.data.quality import SkipSink
from pipelines.stages.ingest import StageDataConfig
from pipelines.stages import entry
from pipelines.stages.loop import LOSS_METRIC, META_FILE, LoopSpec, lr_steps, stage_dataset
from pipelines.tracking import (
    CHECKPOINT, COMPLETE, ENCODER, FAILED_REASON, KIND, STAGE, RunLogger, flatten, start_or_resume,
)


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
    skip_counter: Optional[str] = None
    """Name of the pipeline's :class:`~pipelines.data.quality.SkipCounter` actor."""
    keepalive: list = field(default_factory=list)
    """Driver-side handles that must outlive the stages (the named skip counter actor)."""

    def skips(self, run_id: str) -> Optional[SkipSink]:
        """Where a stage run's decode outcomes are counted (keyed by its MLflow run)."""
        return SkipSink(self.skip_counter, run_id) if self.skip_counter else None

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

    worker: str
    """The module of ``pipelines.stages`` whose ``run_worker`` trains it in a worker."""
    worker_config: dict[str, Any]
    datasets: dict[str, "ray.data.Dataset"]
    split: list[str]
    """Training datasets: split equally, so every rank runs the same number of steps."""
    steps_per_epoch: int
    flops: dict[str, float]
    tags: dict[str, str]
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    evaluation: list[str] = field(default_factory=list)
    """Evaluation datasets: split unequally, so every image is scored exactly once."""


Planner = Callable[[StageContext, str, str], StagePlan]
"""``plan(ctx, stage_name, run_id)`` of a stage module."""


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


def trainer_name(ctx: StageContext, group: str) -> str:
    return f"{ctx.parent_run_id}-{group}"


def resume_epoch(ctx: StageContext, stage_name: str) -> int:
    """The epoch the newest checkpoint of this stage stopped in (0 without one), so that a
    resumed run's data continues with that epoch's order and pairing."""
    newest: dict[str, Any] = {}
    group = ctx.config.group_name(stage_name)
    for meta in (ctx.storage / trainer_name(ctx, group)).glob(f"checkpoint_*/{META_FILE}"):
        info = json.loads(meta.read_text())
        if info.get("stage") == stage_name and info.get("step", -1) > newest.get("step", -1):
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
    while not stop.wait(5.0):  # each poll is two MLflow queries; a group polls for all its stages
        try:
            history = client.get_metric_history(run_id, LOSS_METRIC)
            latest = client.get_run(run_id).data.metrics
        except Exception:  # the store may be busy; the next poll retries
            continue
        if history:
            info = f"loss {history[-1].value:.4f}  {latest.get('train/images_per_s', 0):.1f} img/s"
            progress.update(task, completed=history[-1].step, info=info)
    progress.update(task, completed=total, info="done")


@dataclass
class _Prepared:
    name: str
    spec: StageBase
    run_id: str
    plan: StagePlan
    total_steps: int
    worker_config: dict[str, Any]


def _prepare(ctx: StageContext, name: str, spec: StageBase, run_id: str, plan_fn: Planner) -> _Prepared:
    """Plan an unfinished stage and record its config on its MLflow run."""
    logger = RunLogger(ctx.tracking_uri, run_id)
    plan = plan_fn(ctx, name, run_id)
    logger.params(flatten("", spec.model_dump(mode="json")))
    logger.tags({**stage_tags(ctx.config, name, spec), **plan.tags})
    logger.metrics(plan.flops, 0)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump({"stage": name, **spec.model_dump(mode="json")}, sort_keys=False))
        logger.artifact(resolved)

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
        skip_counter=ctx.skip_counter,
        max_skip_fraction=spec.data.max_skip_fraction,
        bf16=spec.fast and spec.scaling.use_gpu,
    )
    for key, value in plan.spec_overrides.items():
        setattr(loop, key, value)
    return _Prepared(name, spec, run_id, plan, total, {"worker": plan.worker, "loop": asdict(loop), **plan.worker_config})


def _outcome(name: str, run, skipped: bool = False) -> StageOutcome:
    tags = run.data.tags
    return StageOutcome(name, run.info.run_id, dict(run.data.metrics), tags.get(CHECKPOINT) or None,
                        tags.get(ENCODER) or None, skipped=skipped)


def run_worker_group(ctx: StageContext, group: str, names: list[str], planners: dict[str, Planner]) -> list[StageOutcome]:
    """Run stages ``names`` one after another in one Ray Train worker group (a lone stage is
    a group of one). Finished stages are skipped; the rest run in one ``TorchTrainer`` named
    after the pipeline run and ``group``, so running again resumes from its checkpoints.
    A stage stopped by a data or divergence check does not stop the group's later stages;
    the failures are raised together at the end."""
    client = ctx.client()
    specs = ctx.config.all_stages()
    outcomes: dict[str, StageOutcome] = {}
    pending: list[_Prepared] = []
    for name in names:
        run = start_or_resume(client, ctx.experiment_id, name, {KIND: "stage", STAGE: name}, parent_id=ctx.parent_run_id)
        if run.data.tags.get(COMPLETE) == "true":
            client.set_terminated(run.info.run_id, "FINISHED")
            outcomes[name] = _outcome(name, run, skipped=True)
        else:
            spec = specs[name]
            pending.append(_prepare(ctx, name, spec, run.info.run_id, planners["pretrain" if name == "pretrain" else spec.task]))
    if pending:
        _fit(ctx, group, pending)
    failures = []
    for stage in pending:
        run = client.get_run(stage.run_id)
        reason = run.data.tags.get(FAILED_REASON)
        if run.data.tags.get(COMPLETE) == "true" and not reason:
            client.set_terminated(stage.run_id, "FINISHED")
            outcomes[stage.name] = _outcome(stage.name, run)
        else:
            client.set_terminated(stage.run_id, "FAILED")
            failures.append(reason or f"stage {stage.name} did not finish")
    if failures:
        raise StageError("; ".join(failures))
    return [outcomes[name] for name in names]


def _fit(ctx: StageContext, group: str, stages: list[_Prepared]) -> None:
    client = ctx.client()
    scaling = stages[0].spec.scaling  # the config requires one scaling per group
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}

    def names(kind: str) -> list[str]:
        return [stage_dataset(s.name, d) for s in stages for d in getattr(s.plan, kind)]

    trainer = TorchTrainer(
        entry.run_stages,
        train_loop_config={"stages": [s.worker_config for s in stages]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=trainer_name(ctx, group),
            storage_path=str(ctx.storage),
            # Every stage's final checkpoint (final=1) outranks the periodic ones; Ray also
            # always keeps the latest, which a restart resumes from.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=len(stages) + 1, checkpoint_score_attribute="final", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            callbacks=[callback for s in stages for callback in ctx.callbacks.get(s.name, [])],
        ),
        datasets={stage_dataset(s.name, d): ds for s in stages for d, ds in s.plan.datasets.items()},
        dataset_config=StageDataConfig(names("split"), names("evaluation")),
    )
    stop = threading.Event()
    monitors = []
    if ctx.progress is not None:
        for s in stages:
            args = (client, s.run_id, s.name, s.total_steps, ctx.progress, stop)
            monitors.append(threading.Thread(target=_monitor, args=args, daemon=True))
            monitors[-1].start()
    for s in stages:  # a resumed run starts with a clean slate
        if FAILED_REASON in client.get_run(s.run_id).data.tags:
            client.delete_tag(s.run_id, FAILED_REASON)
    try:
        trainer.fit()
    except Exception as exc:
        for s in stages:
            tags = client.get_run(s.run_id).data.tags
            if tags.get(COMPLETE) != "true" and FAILED_REASON not in tags:
                client.set_tag(s.run_id, FAILED_REASON, f"stage {s.name} failed: {type(exc).__name__}: {exc}"[:5000])
    finally:
        stop.set()
        for monitor in monitors:
            monitor.join()


def steps_per_epoch(units: int, units_per_step: int, stage_name: str) -> int:
    steps = units // units_per_step
    if steps < 1:
        raise StageError(
            f"stage {stage_name}: {units} training samples do not fill one global batch of {units_per_step}; "
            "lower batch_size"
        )
    return steps
