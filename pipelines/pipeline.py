"""One pipeline run: pretraining, then the transfer stages, under one MLflow parent run.

Each stage gets a nested run and the previous pretraining stage's encoder checkpoint.
Running the same config again (same ``name``) or with ``resume=<parent run id>``
continues that pipeline: finished stages are skipped, an unfinished one resumes from its
last checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import ray
import yaml
from mlflow.tracking import MlflowClient
from rich.table import Table

from pipelines.config import PipelineConfig, absolute
from pipelines.data.quality import start_skip_counter
from pipelines.stages.driver import StageOutcome, progress_display, run_worker_group
from pipelines.stages.jobs import HEADLINE, StageError
from pipelines.stages.prepare import StageContext
from pipelines.tracking import KIND, RunLogger, ensure_experiment, flatten, resolve_tracking_uri, start_or_resume


@dataclass
class PipelineOutcome:
    run_id: str
    experiment_id: str
    tracking_uri: str
    stages: list[StageOutcome] = field(default_factory=list)


def init_ray(config: PipelineConfig) -> None:
    if ray.is_initialized():
        return
    # Read by Ray Data in every process; a local cluster's workers inherit it from here.
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    joins_a_cluster = config.ray.address or os.environ.get("RAY_ADDRESS")  # e.g. inside a Ray job
    if not joins_a_cluster:
        # One machine is never preempted; the watcher is one more actor per stage.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs = {"num_cpus": config.ray.num_cpus} if (config.ray.num_cpus and not joins_a_cluster) else {}
    ray.init(
        address=config.ray.address, configure_logging=True, logging_level="WARNING",
        logging_config=ray.LoggingConfig(log_level="WARNING"), **kwargs,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


def synthetic_roots(config: PipelineConfig) -> dict[str, Path]:
    if config.synthetic is None:
        return {}
    from pipelines.data.synth import write_synthetic

    syn = config.synthetic
    return {k: Path(v) for k, v in write_synthetic(absolute(syn.root), syn.scale, syn.seed).items()}


def run_pipeline(
    config: PipelineConfig,
    stages: Optional[Sequence[str]] = None,
    resume: Optional[str] = None,
    progress: bool = True,
    parent_run_id: Optional[str] = None,
    callbacks: Optional[dict[str, list]] = None,
) -> PipelineOutcome:
    """Run the selected stages (default: all). ``parent_run_id`` nests the pipeline run
    under another one (a sweep); ``callbacks`` adds Ray Train callbacks per stage."""
    known = list(config.all_stages())
    selected = list(stages) if stages else known
    unknown = sorted(set(selected) - set(known))
    if unknown:
        raise StageError(f"unknown stage(s) {unknown}; this config has {known}")
    uri = resolve_tracking_uri(config.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, config.tracking.experiment, Path.cwd() / "mlartifacts")
    if resume:
        parent = client.get_run(resume)
        if parent.data.tags.get(KIND) != "pipeline":
            raise StageError(f"run {resume} is not a mixmae pipeline run")
    else:
        parent = start_or_resume(client, experiment_id, config.name, {KIND: "pipeline"}, parent_id=parent_run_id)
    check_same_pretraining(config, parent)
    parent_id = parent.info.run_id
    logger = RunLogger(uri, parent_id)
    logger.tags({"method": config.pretrain.method, "encoder": config.pretrain.model})
    logger.params(flatten("", config.model_dump(mode="json")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline_config.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        logger.artifact(path)

    init_ray(config)
    counter_name = f"skips-{parent_id}-{uuid.uuid4().hex[:8]}"  # one per attempt: an old one may still be dying
    display = progress_display() if progress else None
    ctx = StageContext(
        config=config,
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent_id,
        storage=absolute(config.storage),
        synthetic_roots=synthetic_roots(config),
        progress=display,
        callbacks=callbacks or {},
        skip_counter_name=counter_name,
        keepalive=[start_skip_counter(counter_name)],  # the actor lives as long as this handle
    )
    outcome = PipelineOutcome(parent_id, experiment_id, uri)
    stage_specs = config.all_stages()
    groups = config.worker_groups(selected)
    try:
        with display or nullcontext():
            if "pretrain" in selected:
                (result,) = run_worker_group(ctx, "pretrain", ["pretrain"])
                outcome.stages.append(result)
                ctx.encoder_checkpoint = result.encoder_checkpoint
            elif groups:
                ctx.encoder_checkpoint = _finished_encoder(client, experiment_id, parent_id)
            outcome.stages += _run_concurrently(ctx, groups, config.max_parallel_stages)
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    logger.metrics(summary_metrics(config, outcome.stages), 0)
    client.set_terminated(parent_id, "FINISHED" if set(selected) == set(stage_specs) else "RUNNING")
    return outcome


SUMMARY_KEYS = (
    "flops/train_total", "flops/encoder_gmacs", "flops/task_gmacs", "time/wall_s", "time/device_hours", "data/val_images",
)


def summary_metrics(config: PipelineConfig, outcomes: Sequence[StageOutcome]) -> dict[str, float]:
    """Per stage, its headline metric and costs on the pipeline run (``inat2018.val_top1``,
    ``pretrain.flops_train_total``...), so runs compare in the MLflow UI and in reports."""
    stages = config.all_stages()
    out: dict[str, float] = {}
    for result in outcomes:
        headline = HEADLINE[stages[result.name].task]
        keys = {headline, f"{headline}_best", *SUMMARY_KEYS}
        if stages[result.name].task == "detect":
            keys.add("val/segm_AP")
        for key in keys & set(result.metrics):
            out[f"{result.name}.{key.replace('/', '_')}"] = result.metrics[key]
    return out


def check_same_pretraining(config: PipelineConfig, parent) -> None:
    """Refuse to continue a pipeline run with another pretraining method or encoder: its
    checkpoints hold the other model, which would not load (or would load into the wrong one)."""
    logged = parent.data.params
    for field in ("method", "model"):
        was, now = logged.get(f"pretrain.{field}"), str(getattr(config.pretrain, field))
        if was is not None and was != now:
            raise StageError(
                f"pipeline {config.name} (MLflow run {parent.info.run_id}) was started with pretrain.{field} {was}; "
                f"its checkpoints cannot continue as {now}. Give this config another name, or set {field} back"
            )


def _run_concurrently(ctx: StageContext, groups: list[tuple[str, list[str]]], parallel: int) -> list[StageOutcome]:
    """Transfer stages depend only on pretraining: run up to ``parallel`` worker groups at
    once. A failed group does not stop the others; the failures are raised together at the
    end. Outcomes come back in config order."""
    results: dict[str, StageOutcome] = {}
    failures: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="stage") as pool:
        futures = [pool.submit(run_worker_group, ctx, group, names) for group, names in groups]
        for future in as_completed(futures):
            try:
                results.update((result.name, result) for result in future.result())
            except Exception as exc:
                failures.append(exc)
    if failures:
        raise StageError("; ".join(f"{exc}" for exc in failures))
    return [results[name] for name in ctx.config.stages if name in results]


def _finished_encoder(client: MlflowClient, experiment_id: str, parent_id: str) -> Optional[str]:
    """The encoder of this pipeline's finished pretraining stage, if it has one."""
    from pipelines.tracking import COMPLETE, ENCODER, STAGE, find_run
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = find_run(client, experiment_id, **{STAGE: "pretrain", MLFLOW_PARENT_RUN_ID: parent_id, COMPLETE: "true"})
    return run.data.tags.get(ENCODER) if run else None


def summary_table(config: PipelineConfig, outcome: PipelineOutcome) -> Table:
    """One row per stage: its headline metric at the end of training ("final") and the best
    of its evaluations ("best", as the official scripts report), its FLOPs and wall time."""
    table = Table(title=f"pipeline {config.name} (MLflow run {outcome.run_id})")
    for column in ("stage", "metric", "final", "best", "GFLOPs", "train FLOPs", "wall s", "note"):
        table.add_column(column, justify="right" if column not in ("stage", "metric", "note") else "left")
    stages = config.all_stages()
    for result in outcome.stages:
        key = HEADLINE[stages[result.name].task]
        m = result.metrics
        best = m.get(f"{key}_best")
        table.add_row(
            result.name,
            key,
            f"{m.get(key, float('nan')):.4f}",
            "" if best is None else f"{best:.4f}",
            f"{m.get('flops/encoder_gmacs', m.get('flops/task_gmacs', float('nan'))):.2f}",
            f"{m.get('flops/train_total', 0):.2e}",
            f"{m.get('time/wall_s', float('nan')):.0f}",
            "skipped (finished earlier)" if result.skipped else "",
        )
    return table
