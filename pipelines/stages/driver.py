"""Driver side of the stages: one MLflow run per stage, one Ray Train ``TorchTrainer`` per
worker group of stages (usually a stage alone), resumable.

``run_worker_group(ctx, group, names)`` runs stages the same way for all: it finds or
creates each stage's MLflow run (a finished stage is skipped), prepares the unfinished ones
(:mod:`pipelines.stages.prepare`), logs their resolved config, FLOPs and tags, starts the
trainer under a name derived from the pipeline run (so running again resumes from its
checkpoints) and shows progress. The workers record each stage's completion.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import ray.train
import yaml
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines import storage
from pipelines.config import PipelineConfig
from pipelines.stage_config import PretrainStage, Scaling, StageBase
from pipelines.stages import entry
from pipelines.console import PROGRESS_EVERY_S
from pipelines.stages.jobs import HEADLINE, Preempted, StageError, TrackingAway
from pipelines.stages.checkpoints import CORRUPT_DIR, META_FILE
from pipelines.stages.loop import PREEMPTED, SKIPPED_CHECKPOINTS
from pipelines.stages.state import LOSS_METRIC
from pipelines.stages.prepare import PreparedStage, StageContext, prepare_stage, trainer_name
from pipelines.data.quality import PARTNER_SKIPPED
from pipelines.tracking import (
    CHECKPOINT, COMPLETE, ENCODER, FAILED_REASON, KIND, STAGE, RunLogger, flatten, open_spool, run_spool, run_spools,
    start_or_resume,
)

#: pending records this long mean the server is away (a healthy one takes them within a second)
SERVER_AWAY_AFTER_S = 20.0


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


def _watch(ctx: StageContext, stage: PreparedStage, stop: threading.Event) -> None:
    """Follow a stage on the console from what rank 0 spools for MLflow and saves to storage
    (so the console goes on while the tracking server is away): progress, resumption,
    checkpoints, skipped images, and the server going away and coming back."""
    console = ctx.console
    name, run_id, total = stage.job.name, stage.job.loop.run_id, stage.job.loop.total_steps
    bar = console.progress.add_task(name, total=total, info="starting workers") if console.progress else None
    checkpoints = storage.join(ctx.storage, trainer_name(ctx, ctx.config.group_name(name)))
    saved = set(_new_checkpoints(checkpoints, set()))
    spool = run_spool(ctx.local, ctx.tracking_uri, run_id)
    offset = spool.end()  # what an earlier attempt spooled is not news
    latest: dict[str, tuple[float, int]] = {}
    skipped, last_line, waiting_since, said_away = 0, time.monotonic(), None, False
    while not stop.wait(2.0):
        for offset, record in spool.records(offset):
            if record["kind"] == "metrics":
                latest.update({key: (value, step) for key, value, _, step in record["metrics"]})
            elif record["kind"] == "tags":
                if SKIPPED_CHECKPOINTS in record["tags"]:
                    console.event(f"{name}: passed over checkpoints that do not load (copies kept in "
                                  f"{storage.join(ctx.storage, CORRUPT_DIR)}): {record['tags'][SKIPPED_CHECKPOINTS]}",
                                  "yellow")
                if "mixmae.resumed_from" in record["tags"]:
                    console.event(f"{name}: resumed from its checkpoint at {record['tags']['mixmae.resumed_from']}")
        for folder in _new_checkpoints(checkpoints, saved):
            saved.add(folder)
            info = json.loads(storage.read_text(storage.join(checkpoints, folder, META_FILE)))
            if info.get("stage") == name and not info.get("final"):
                console.event(f"{name}: checkpoint saved at step {info['step']} ({storage.join(checkpoints, folder)})")
        bad = {k.removeprefix("data/skipped_"): int(v) for k, (v, _) in latest.items()
               if k.startswith("data/skipped_") and not k.endswith(PARTNER_SKIPPED) and v}
        if sum(bad.values()) > skipped:
            skipped = sum(bad.values())
            console.event(f"{name}: {skipped} images skipped so far ({', '.join(f'{r}: {n}' for r, n in bad.items())})", "yellow")
        if spool.has_pending():
            waiting_since = waiting_since or time.monotonic()
            if not said_away and time.monotonic() - waiting_since > SERVER_AWAY_AFTER_S:
                said_away = True
                console.event(f"{name}: the tracking server {ctx.tracking_uri} is not taking records; training goes on, "
                              f"they wait in {spool.dir}", "yellow")
        else:
            if said_away:
                console.event(f"{name}: the tracking server takes records again; what waited is delivered", "green")
            waiting_since, said_away = None, False
        if LOSS_METRIC in latest:
            loss, step = latest[LOSS_METRIC]
            info = f"loss {loss:.4f}  {latest.get('train/images_per_s', (0.0, 0))[0]:.1f} img/s"
            if bar is not None:
                console.progress.update(bar, completed=step, info=info)
            elif time.monotonic() - last_line >= PROGRESS_EVERY_S:
                last_line = time.monotonic()
                console.event(f"{name}: step {step}/{total}, {info}")
    if bar is not None:
        console.progress.update(bar, completed=total, info="done")


def _new_checkpoints(trainer: str, known: set[str]) -> list[str]:
    """The trainer's checkpoint folders not in ``known`` that hold their meta file (none while
    the storage does not answer: the console waits for the next look)."""
    try:
        return [folder for folder in storage.folders(trainer) if folder.startswith("checkpoint_")
                and folder not in known and storage.exists(storage.join(trainer, folder, META_FILE))]
    except OSError:
        return []


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


def _record_inputs(ctx: StageContext, prepared: PreparedStage) -> None:
    """The splits the stage read, as MLflow dataset inputs: counted after training, so each
    carries how many of its images were read and how many were skipped. Spooled with the
    stage's other records, so they reach the server in the same delivery."""
    datasets = []
    for item in prepared.inputs:
        skips = ctx.skips(prepared.job.loop.run_id, item.split)
        counts = skips.snapshot() if skips else {"attempted": 0, "skipped": {}}
        profile = {"split": item.split, "images": item.num_images, "decoded": counts["attempted"],
                   "skipped": sum(n for reason, n in counts["skipped"].items() if reason != PARTNER_SKIPPED)}
        datasets.append({"name": item.name, "source": item.source, "digest": item.digest, "context": item.context,
                         "profile": profile})
    run_id = prepared.job.loop.run_id
    RunLogger(ctx.tracking_uri, run_id, spool=run_spool(ctx.local, ctx.tracking_uri, run_id)).inputs(datasets)


def deliver_stage_records(ctx: StageContext, stages: list[PreparedStage]) -> None:
    """Deliver what the stages' workers spooled and could not send yet, waiting up to
    ``tracking.delivery_wait_s`` for the server; if it does not answer, the stage has still
    trained and saved its checkpoints, and the error says how to deliver later."""
    wait = ctx.config.tracking.delivery_wait_s
    left = [d for s in stages for d in run_spools(ctx.local, s.job.loop.run_id)
            if not open_spool(d, lambda m: say(ctx, m, "yellow")).drain(wait / len(stages))]
    if left:
        raise TrackingAway(
            f"stage(s) {', '.join(s.job.name for s in stages)} finished training and saved checkpoints, but the "
            f"tracking server {ctx.tracking_uri} did not take their records within {wait:.0f} s; they wait in "
            f"{', '.join(map(str, left))}. `mixmae sync` (or running the same command again) delivers them."
        )


def say(ctx: StageContext, message: str, style: str = "") -> None:
    if ctx.console is not None:
        ctx.console.event(message, style)


def _outcome(name: str, run, skipped: bool = False) -> StageOutcome:
    tags = run.data.tags
    return StageOutcome(name, run.info.run_id, dict(run.data.metrics), tags.get(CHECKPOINT) or None,
                        tags.get(ENCODER) or None, skipped=skipped)


def run_worker_group(
    ctx: StageContext, group: str, names: list[str], beside: Sequence[float] = ()
) -> list[StageOutcome]:
    """Run stages ``names`` one after another in one Ray Train worker group (a lone stage is
    a group of one), beside the pipeline's groups whose CPUs ``beside`` lists. Finished stages
    are skipped; the rest run in one ``TorchTrainer`` named after the pipeline run and
    ``group``, so running again resumes from its checkpoints. A stage stopped by a data or
    divergence check does not stop the group's later stages; the failures are raised together
    at the end."""
    client = ctx.client()
    outcomes: dict[str, StageOutcome] = {}
    pending: list[PreparedStage] = []
    for name in names:
        run = start_or_resume(client, ctx.experiment_id, name, {KIND: "stage", STAGE: name}, parent_id=ctx.parent_run_id)
        if run.data.tags.get(COMPLETE) == "true":
            client.set_terminated(run.info.run_id, "FINISHED")
            outcomes[name] = _outcome(name, run, skipped=True)
            say(ctx, f"{name}: finished in an earlier run, skipped")
            if name == "pretrain":  # the group's later stages start from its encoder
                ctx.encoder_checkpoint = outcomes[name].encoder_checkpoint
        else:
            try:
                pending.append(prepare_stage(ctx, name, run.info.run_id, [s.job.name for s in pending], beside))
            except Exception as exc:  # its data is missing, say: the stage's run says why, not only the pipeline's
                client.set_tag(run.info.run_id, FAILED_REASON, str(exc)[:5000])
                client.set_terminated(run.info.run_id, "FAILED")
                raise
            _record_start(ctx, pending[-1])
            job = pending[-1].job
            say(ctx, f"{name}: started, {job.loop.total_steps} steps on {job.spec.scaling.num_workers} worker(s), "
                     f"{job.model} pretrained with {pending[-1].tags['method']} (MLflow run {job.loop.run_id})")
    if pending:
        if ctx.stop_file and storage.exists(ctx.stop_file):
            raise Preempted(f"stopped (SIGTERM) before {', '.join(s.job.name for s in pending)} started; "
                            "run the same command again to continue")
        _fit(ctx, group, pending)
    stopped, unfinished = {}, []
    for stage in pending:
        tags = client.get_run(stage.job.loop.run_id).data.tags
        if tags.get(COMPLETE) != "true":
            unfinished.append(stage.job.loop.run_id)
            if PREEMPTED in tags:
                stopped[stage.job.name] = tags[PREEMPTED]
    if stopped:
        for run_id in unfinished:  # stopped, or waiting on a stopped stage's encoder: both go on when run again
            client.set_terminated(run_id, "KILLED")
        raise Preempted(f"stopped (SIGTERM): {', '.join(f'{n} saved a checkpoint at {at}' for n, at in stopped.items())}; "
                        "run the same command again to continue")
    failures = []
    for stage in pending:
        name, run_id = stage.job.name, stage.job.loop.run_id
        run = client.get_run(run_id)
        reason = run.data.tags.get(FAILED_REASON)
        source = stage.job.weights_from
        if run.data.tags.get(COMPLETE) == "true" and not reason:
            if source:  # the encoder its workers found, in place of PENDING_ENCODER
                client.set_tag(run_id, "init", outcomes[source].encoder_checkpoint)
            client.set_terminated(run_id, "FINISHED")
            outcomes[name] = _outcome(name, run)
            headline = HEADLINE[stage.job.task]
            value, best = run.data.metrics.get(headline), run.data.metrics.get(f"{headline}_best")
            say(ctx, f"{name}: finished, {headline} {value:.4f}{f' (best {best:.4f})' if best is not None else ''} "
                     f"in {run.data.metrics.get('time/wall_s', 0):.0f} s", "green")
        else:
            client.set_terminated(run_id, "FAILED")
            if not reason and source and source not in outcomes:
                reason = f"stage {name} did not run: it starts from the encoder stage {source} exports, and {source} did not finish"
                client.set_tag(run_id, FAILED_REASON, reason)
            failures.append(reason or f"stage {name} did not finish")
            say(ctx, f"{name}: failed: {failures[-1]}", "red")
    if failures:
        raise StageError("; ".join(failures))
    return [outcomes[name] for name in names]


def worker_group(scaling: Scaling) -> dict:
    """The ``TorchTrainer`` arguments that start a worker group as ``scaling`` says."""
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return {
        "scaling_config": ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        "torch_config": TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
    }


def _fit(ctx: StageContext, group: str, stages: list[PreparedStage]) -> None:
    client = ctx.client()
    scaling = stages[0].job.spec.scaling  # the config requires one scaling per group
    trainer = TorchTrainer(
        entry.run_stages,
        train_loop_config=entry.train_loop_config([s.job for s in stages]),
        **worker_group(scaling),
        run_config=ray.train.RunConfig(
            name=trainer_name(ctx, group),
            **storage.train_storage(ctx.storage),
            # Every stage's final checkpoint (final=1) outranks the periodic ones; Ray also
            # always keeps the latest, which a restart resumes from.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=len(stages) + 1, checkpoint_score_attribute="final", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            callbacks=[entry.StageReports(s.job.name, callback) for s in stages for callback in ctx.callbacks.get(s.job.name, [])],
        ),
    )
    stop = threading.Event()
    monitors = []
    if ctx.console is not None:
        for s in stages:
            monitors.append(threading.Thread(target=_watch, args=(ctx, s, stop), daemon=True))
            monitors[-1].start()
    for s in stages:  # a resumed run starts with a clean slate
        for tag in set(client.get_run(s.job.loop.run_id).data.tags) & {FAILED_REASON, PREEMPTED}:
            client.delete_tag(s.job.loop.run_id, tag)
    error = None
    try:
        trainer.fit()
    except Exception as exc:
        error = exc
    finally:
        stop.set()
        for monitor in monitors:
            monitor.join()
    for s in stages:
        _record_inputs(ctx, s)
    deliver_stage_records(ctx, stages)
    if error is not None:
        for s in stages:
            tags = client.get_run(s.job.loop.run_id).data.tags
            if tags.get(COMPLETE) != "true" and FAILED_REASON not in tags:
                message = f"stage {s.job.name} failed: {type(error).__name__}: {error}"
                client.set_tag(s.job.loop.run_id, FAILED_REASON, message[:5000])
