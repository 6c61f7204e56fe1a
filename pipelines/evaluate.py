"""``mixmae eval``: score a finished checkpoint on a classification stage's validation split,
nothing trained: ours (a classification stage's), or a published fine-tuned one brought in by
``mixmae convert``, so its number can be checked against its paper's.

The split is read and scored by a Ray Train worker group of the stage's scaling (each worker
its slice of the split, once), as the stage's own evaluations are; the result is an MLflow run
(tag ``mixmae.kind=eval``) with top-1 and top-5 and their 95% intervals (Wilson's, over the
validation images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from mixmae_core.checkpoint import checkpoint_info, load_state_dict
from pipelines import storage
from pipelines.config import PipelineConfig
from pipelines.stage_config import ClassifyStage
from pipelines.pipeline import init_ray, synthetic_roots, usable_storage
from pipelines.report_stats import wilson_interval
from pipelines.stages import entry
from pipelines.stages.classify import checkpoint_kind, head_classes
from pipelines.stages.driver import worker_group
from pipelines.stages.jobs import DataRecipe, LoopSpec, StageError, StageJob, data_cpus
from pipelines.stages.prepare import StageContext, resolve_source, split_size
from pipelines.tracking import KIND, RunLogger, ensure_experiment, resolve_tracking_uri, start_or_resume


@dataclass
class Scored:
    run_id: str
    tracking_uri: str
    images: int
    metrics: dict[str, float]


def evaluate_checkpoint(config: PipelineConfig, stage_name: str, checkpoint: str) -> Scored:
    """Score ``checkpoint`` (a path or an object store URI) on ``stage_name``'s validation split."""
    spec = config.stages.get(stage_name)
    if not isinstance(spec, ClassifyStage):
        choices = [name for name, stage in config.stages.items() if isinstance(stage, ClassifyStage)]
        raise StageError(f"stage {stage_name!r} is not a classification stage of {config.name}; choose one of {choices}")
    checkpoint, root = storage.absolute(checkpoint), usable_storage(config.storage)
    try:
        found = storage.is_file(checkpoint)
    except OSError as exc:
        raise StageError(storage.describe(checkpoint, exc)) from None
    if not found:
        raise StageError(f"checkpoint {checkpoint} does not exist")
    local = storage.local_copy(checkpoint)
    state = load_state_dict(local)
    kind = checkpoint_kind(state)
    init_ray(config)
    uri = resolve_tracking_uri(config.tracking.uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, config.tracking.experiment, Path.cwd() / "mlartifacts")
    ctx = StageContext(config, uri, experiment_id, "", root, synthetic_roots(config))
    source = resolve_source(ctx, stage_name, spec.data)
    images = split_size(source, spec.data.val_split, stage_name)
    if kind == "encoder":
        raise StageError(f"{checkpoint} holds an encoder without a classification head: nothing to score; fine-tune "
                         "or linear-probe it first (a stage of `mixmae run`)")
    if head_classes(state) != source.num_classes:
        raise StageError(f"{checkpoint} classifies {head_classes(state)} classes; stage {stage_name}'s data has "
                         f"{source.num_classes}: score it on the dataset it was trained for")
    model = checkpoint_info(local).get("model") or config.stage_model(spec)
    run = start_or_resume(client, experiment_id, f"eval-{stage_name}-{local.stem}", {KIND: "eval"}, resume=False)
    logger = RunLogger(uri, run.info.run_id)
    logger.params({"checkpoint": checkpoint, "stage": stage_name, "encoder": model, "checkpoint_kind": kind,
                   "data": str(source.files[0]), "split": spec.data.val_split, "img_size": spec.img_size})
    recipe = DataRecipe("classify", source, dict(split=spec.data.val_split, train=False, img_size=spec.img_size,
                                                 crop_pct=spec.crop_pct, auto_augment=None))
    loop = LoopSpec(uri, run.info.run_id, steps_per_epoch=1, total_steps=0, warmup_steps=0, lr=0.0,
                    data_cpus=data_cpus(ray.cluster_resources().get("CPU", 1.0), spec.scaling))
    job = StageJob(stage_name, spec, model, encoder_weights=checkpoint, num_classes=source.num_classes,
                   class_names=tuple(source.classes), loop=loop, data={"val": recipe})
    try:
        TorchTrainer(
            entry.score_checkpoint, train_loop_config=entry.train_loop_config([job]), **worker_group(spec.scaling),
            run_config=ray.train.RunConfig(name=f"eval-{run.info.run_id}", **storage.train_storage(root)),
        ).fit()
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    metrics = dict(client.get_run(run.info.run_id).data.metrics)
    for key in ("val/top1", "val/top5"):
        low, high = wilson_interval(metrics[key], images)
        metrics.update({f"{key}_ci95_low": low, f"{key}_ci95_high": high})
    logger.metrics({**metrics, "data/val_images": images}, 0)
    client.set_terminated(run.info.run_id, "FINISHED")
    return Scored(run.info.run_id, uri, images, metrics)
