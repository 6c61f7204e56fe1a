"""Driver side of the stages: one MLflow run per stage, one Ray Train ``TorchTrainer`` per
worker group of stages (usually a stage alone), resumable.

``run_worker_group(ctx, group, names)`` runs stages the same way for all: it finds or
creates each stage's MLflow run (a finished stage is skipped), prepares the unfinished ones
(:mod:`pipelines.stages.prepare`), logs their resolved config, FLOPs and tags, starts the
trainer under a name derived from the pipeline run (so running again resumes from its
checkpoints) and shows progress. The workers record each stage's completion.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray.train
import yaml
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines.config import PipelineConfig, PretrainStage, StageBase
from pipelines.data.ray_internals import StageDataConfig
from pipelines.stages import entry
from pipelines.stages.jobs import StageError, stage_dataset
from pipelines.stages.loop import LOSS_METRIC
from pipelines.stages.prepare import PreparedStage, StageContext, prepare_stage, trainer_name
from pipelines.tracking import (
    CHECKPOINT, COMPLETE, ENCODER, FAILED_REASON, KIND, STAGE, RunLogger, flatten, start_or_resume,
)


@dataclass
class StageOutcome:
    name: str
    run_id: str
    metrics: dict[str, float]
    checkpoint: Optional[str]
    encoder_checkpoint: Optional[str]
    skipped: bool = False


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


def _record_start(ctx: StageContext, prepared: PreparedStage) -> None:
    """The stage's resolved config (params and ``config.yaml``), tags and FLOPs on its run."""
    job = prepared.job
    logger = RunLogger(ctx.tracking_uri, job.loop.run_id)
    # method and encoder as params too, so the MLflow compare view can plot by them
    logger.params({**flatten("", job.spec.model_dump(mode="json")), "method": prepared.tags["method"],
                   "encoder": prepared.tags["encoder"]})
    logger.tags({**stage_tags(ctx.config, job.name, job.spec), **prepared.tags})
    logger.metrics(prepared.flops, 0)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump({"stage": job.name, **job.spec.model_dump(mode="json")}, sort_keys=False))
        logger.artifact(resolved)


def _outcome(name: str, run, skipped: bool = False) -> StageOutcome:
    tags = run.data.tags
    return StageOutcome(name, run.info.run_id, dict(run.data.metrics), tags.get(CHECKPOINT) or None,
                        tags.get(ENCODER) or None, skipped=skipped)


def run_worker_group(ctx: StageContext, group: str, names: list[str]) -> list[StageOutcome]:
    """Run stages ``names`` one after another in one Ray Train worker group (a lone stage is
    a group of one). Finished stages are skipped; the rest run in one ``TorchTrainer`` named
    after the pipeline run and ``group``, so running again resumes from its checkpoints.
    A stage stopped by a data or divergence check does not stop the group's later stages;
    the failures are raised together at the end."""
    client = ctx.client()
    outcomes: dict[str, StageOutcome] = {}
    pending: list[PreparedStage] = []
    for name in names:
        run = start_or_resume(client, ctx.experiment_id, name, {KIND: "stage", STAGE: name}, parent_id=ctx.parent_run_id)
        if run.data.tags.get(COMPLETE) == "true":
            client.set_terminated(run.info.run_id, "FINISHED")
            outcomes[name] = _outcome(name, run, skipped=True)
        else:
            pending.append(prepare_stage(ctx, name, run.info.run_id))
            _record_start(ctx, pending[-1])
    if pending:
        _fit(ctx, group, pending)
    failures = []
    for stage in pending:
        name, run_id = stage.job.name, stage.job.loop.run_id
        run = client.get_run(run_id)
        reason = run.data.tags.get(FAILED_REASON)
        if run.data.tags.get(COMPLETE) == "true" and not reason:
            client.set_terminated(run_id, "FINISHED")
            outcomes[name] = _outcome(name, run)
        else:
            client.set_terminated(run_id, "FAILED")
            failures.append(reason or f"stage {name} did not finish")
    if failures:
        raise StageError("; ".join(failures))
    return [outcomes[name] for name in names]


def _fit(ctx: StageContext, group: str, stages: list[PreparedStage]) -> None:
    client = ctx.client()
    scaling = stages[0].job.spec.scaling  # the config requires one scaling per group
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}

    def names(kind: str) -> list[str]:
        return [stage_dataset(s.job.name, d) for s in stages for d in getattr(s, kind)]

    trainer = TorchTrainer(
        entry.run_stages,
        train_loop_config={"jobs": [s.job for s in stages]},
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
            callbacks=[callback for s in stages for callback in ctx.callbacks.get(s.job.name, [])],
        ),
        datasets={stage_dataset(s.job.name, d): ds for s in stages for d, ds in s.datasets.items()},
        dataset_config=StageDataConfig(names("split"), names("evaluation")),
    )
    stop = threading.Event()
    monitors = []
    if ctx.progress is not None:
        for s in stages:
            args = (client, s.job.loop.run_id, s.job.name, s.job.loop.total_steps, ctx.progress, stop)
            monitors.append(threading.Thread(target=_monitor, args=args, daemon=True))
            monitors[-1].start()
    for s in stages:  # a resumed run starts with a clean slate
        if FAILED_REASON in client.get_run(s.job.loop.run_id).data.tags:
            client.delete_tag(s.job.loop.run_id, FAILED_REASON)
    try:
        trainer.fit()
    except Exception as exc:
        for s in stages:
            tags = client.get_run(s.job.loop.run_id).data.tags
            if tags.get(COMPLETE) != "true" and FAILED_REASON not in tags:
                message = f"stage {s.job.name} failed: {type(exc).__name__}: {exc}"
                client.set_tag(s.job.loop.run_id, FAILED_REASON, message[:5000])
    finally:
        stop.set()
        for monitor in monitors:
            monitor.join()
