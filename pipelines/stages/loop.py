"""The training loop every stage runs inside its Ray Train workers.

A stage supplies a :class:`Task` (model, optimizer, its micro-batches, loss, optional
evaluation and pictures); this module owns what they share. It reads top to bottom as
MAE's ``train_one_epoch``::

    run = start(task, logger, resume)               # build, restore the checkpoint
    while run.state.step < total_steps:
        for step in epoch_steps(run):               # the epoch's batches, from the checkpoint's position
            optimizer_step(run, step)               # accumulate, clip, step
            after_step(run)                         # log, evaluate, pictures, checkpoint
        next_epoch(run)
    finish(run)                                     # evaluate, final checkpoint

What a step trains on is a function of the seed, epoch, step and number of workers only:
each worker reads its own :class:`~pipelines.data.order.Shard` of the epoch in order, and
a checkpoint records each worker's position in it, so a resumed or restarted run reads on
from there (nothing it trained on is read again). Before each step the workers agree that
every one of them has a full step's micro-batches (an epoch ends at its last full step) and
whether the driver asked them to stop; ``data/fingerprint`` chains the image ids of every
step, so two runs that trained on the same data log the same fingerprints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mixmae_core.optim import build_scheduler
from pipelines import storage
from pipelines.data.order import Shard
from pipelines.data.quality import DataQualityError, check_skip_threshold
from pipelines.data.transforms import seed_global_rngs
from pipelines.spool import Spool
from pipelines.stages.checkpoints import CORRUPT_DIR
from pipelines.stages.distributed import all_gather_ints, all_reduce, shard, unwrap
from pipelines.stages.jobs import LoopSpec
from pipelines.stages.state import (
    LOSS_METRIC, Resume, Run, StopRequest, TrainState, restore, save_checkpoint,
)
from pipelines.stages.task import MicroBatch, StopTraining, Task
from pipelines.tracking import FAILED_REASON, RunLogger, delivered_step, run_spool, spooled_step, system_metrics

FINGERPRINT_METRIC = "data/fingerprint"
SKIPPED_CHECKPOINTS = "mixmae.skipped_checkpoints"
PREEMPTED = "mixmae.preempted"
#: how long a worker's sender may go on delivering after training; the driver delivers the rest
#: (and a sender that already finds the server away hands over at once: the driver waits anyway)
WORKER_DELIVERY_WAIT_S = 10.0
#: fingerprints are 48-bit, so MLflow's float64 metrics hold them exactly
_FINGERPRINT_BYTES = 6
worker_log = logging.getLogger(__name__)


class StopAsked(Exception):
    """The driver was asked to stop (SIGTERM): every rank saved a checkpoint at this step."""


def _chain(previous: int, data: bytes) -> int:
    digest = hashlib.blake2b(previous.to_bytes(8, "little") + data, digest_size=_FINGERPRINT_BYTES).digest()
    return int.from_bytes(digest, "little")


# ----------------------------------------------------------------------------- the worker's entry


def train(task: Task, resume: Resume) -> None:
    """Run (or resume from ``resume``) a stage's training in this Ray Train worker.

    Rank 0 logs to MLflow through a spool (and so does the first worker of every other node,
    with its node's system metrics): training never waits on the tracking server, and what
    the server missed is delivered when it answers again. The spool is in the pipeline's
    storage when that is a folder, else in the node's own (:func:`pipelines.storage.local_root`):
    a worker on the driver's node leaves what it could not deliver to the driver, one on
    another node waits for the server up to ``tracking.delivery_wait_s`` before it ends. A
    :class:`StopTraining` condition ends the worker normally after tagging the MLflow run
    with the reason; the driver turns that tag into the stage's error.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # The spool retries with back-off; the client's own retries would only hold up its sender.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "20"
    spec = task.job.loop
    context = ray.train.get_context()
    rank = context.get_world_rank()
    several_nodes = context.get_local_world_size() < context.get_world_size()
    node = f"node{context.get_node_rank()}" if several_nodes else None
    spools: list[Spool] = []
    local = storage.local_root(spec.storage)

    def spool(part: str = "") -> Spool:
        spools.append(run_spool(local, spec.tracking_uri, spec.run_id, part, say=worker_log.warning).start())
        return spools[-1]

    logger = None
    if rank == 0:
        main = spool()
        logged = spooled_step(main, LOSS_METRIC)
        if storage.is_remote(spec.storage):  # an earlier attempt may have spooled on another node
            logged = max(logged, delivered_step(spec.tracking_uri, spec.run_id, LOSS_METRIC))
        logger = RunLogger(spec.tracking_uri, spec.run_id, logged, spool=main)
    hands_over = not storage.is_remote(spec.storage) or ray.get_runtime_context().get_node_id() == spec.driver_node
    watching = spec.system_metrics_every_s is not None and context.get_local_rank() == 0  # one sampler a node
    try:
        with _node_metrics(spec, node, spools[0] if rank == 0 else spool(node or f"rank{rank}")) if watching else nullcontext():
            _train(task, logger, resume)
    except StopTraining as exc:
        if logger is not None:
            logger.tags({FAILED_REASON: str(exc)})
    except StopAsked as exc:
        if logger is not None:
            logger.tags({PREEMPTED: str(exc)})
    finally:
        for each in spools:  # what is not delivered in time stays on disk, for the driver if it can read it
            if hands_over:
                each.close(0.0 if each.unreachable_since is not None else WORKER_DELIVERY_WAIT_S)
            else:
                each.close(spec.delivery_wait_s)


def _node_metrics(spec: LoopSpec, node: Optional[str], spool: Spool):
    series = f"system/{node}/cpu_utilization_percentage" if node else "system/cpu_utilization_percentage"
    logger = RunLogger(spec.tracking_uri, spec.run_id, spool=spool)
    return system_metrics(logger.metrics, node, spec.system_metrics_every_s, first_step=spooled_step(spool, series) + 1)


def _train(task: Task, logger: Optional[RunLogger], resume: Resume) -> None:
    run = start(task, logger, resume)
    while run.state.step < run.spec.total_steps:
        stepped = False
        for step in epoch_steps(run):
            optimizer_step(run, step)
            after_step(run)
            stepped = True
        if run.state.step < run.spec.total_steps:
            next_epoch(run, stepped)
    finish(run)


# ----------------------------------------------------------------------------- the steps


def start(task: Task, logger: Optional[RunLogger], resume: Resume) -> Run:
    """Build the model, optimizer and schedule on this worker and restore the stage's checkpoint."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec, config = task.job.loop, task.spec
    device = ray.train.torch.get_device()
    seed_global_rngs(config.seed * 1000 + rank)
    model = task.build(device)
    sharded = task.sharded
    if sharded:  # before the optimizer: it holds the shards
        shard(model, device)
    optimizer = task.optimizer(model, spec.lr)
    scheduler = build_scheduler(optimizer, spec.total_steps, spec.warmup_steps, config.min_lr)
    trained = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 and not sharded else model
    run = Run(task, spec, logger, trained, optimizer, scheduler, TrainState(), rank, world, device, sharded,
              bad_step=torch.full((), -1, dtype=torch.long, device=device), stop=StopRequest(spec.stop_file))
    found, skipped = resume.take(run.stage)
    if found is not None:
        restore(run, found)
    del found
    run.device_seconds0 = run.state.device_seconds
    if logger and skipped:
        worker_log.warning("checkpoints that do not load were passed over (copies in %s): %s", CORRUPT_DIR, skipped)
        logger.tags({SKIPPED_CHECKPOINTS: "; ".join(skipped)})
    if logger and run.last_good:
        logger.tags({"mixmae.resumed_from": run.last_good})
    return run


@dataclass
class Step:
    """One optimizer step's micro-batches on this worker, and the fingerprint of what every
    worker's micro-batches hold."""

    batches: list[MicroBatch]
    fingerprint: int


def epoch_steps(run: Run) -> Iterator[Step]:
    """The steps of the current epoch, from this worker's position in it. Before each, the
    workers agree whether all of them have a full step (else the epoch ends) and whether
    the driver asked them to stop (then they save a checkpoint and stop)."""
    units_per_micro = run.config.micro_batch() // run.task.images_per_unit
    shard = Shard(rank=run.rank, world=run.world, epoch=run.state.epoch, start=run.state.position,
                  limit=run.spec.steps_per_epoch * run.accum * units_per_micro, block=units_per_micro)
    stream = run.task.batches("train", shard)
    while run.state.step < run.spec.total_steps:
        waited = time.perf_counter()
        batches = list(islice(stream, run.accum))
        run.window.wait += time.perf_counter() - waited
        ids = b"".join(b.image_ids.numpy().astype(np.int64).tobytes() for b in batches)
        asked = run.stop.asked()
        agreed = all_gather_ints([int(len(batches) < run.accum), int(asked), _chain(0, ids)])
        if agreed[:, 1].any():
            if run.saved_step != run.state.step:
                check_finite(run)
                save_checkpoint(run, run.metrics)
            raise StopAsked(f"step {run.state.step}")
        if agreed[:, 0].any():
            return
        yield Step(batches, _chain(run.state.fingerprint, agreed[:, 2].numpy().tobytes()))


def optimizer_step(run: Run, step: Step) -> None:
    """Forward and backward every micro-batch of the step (gradients averaged across workers
    at the last one), then clip (or measure) the gradients and step the optimizer."""
    state = run.state
    for i, micro in enumerate(step.batches):
        last = i == len(step.batches) - 1
        with _gradient_sync(run, last):
            with torch.autocast(run.device.type, dtype=torch.bfloat16) if run.spec.bf16 else nullcontext():
                loss, n_images, extra = run.task.loss(run.model, micro, state.step)
            (loss / run.accum).backward()
        run.window.add(loss, n_images, extra)
        run.bad_step = torch.where((run.bad_step < 0) & ~torch.isfinite(loss.detach()), state.step + 1, run.bad_step)
        state.images_seen += n_images * run.world
    run.scheduler.step_update(state.step)
    clip = run.config.clip_grad
    if clip or _logging_step(run, state.step + 1):
        params = [p for p in run.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
        run.window.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded: a DTensor
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.step_in_epoch += 1
    state.position = int(step.batches[-1].positions.max()) + 1
    state.fingerprint = step.fingerprint
    state.device_seconds = run.device_seconds0 + (time.perf_counter() - run.started) * run.world


def _gradient_sync(run: Run, sync: bool):
    """Averaging gradients across workers only at a step's last micro-batch."""
    if run.sharded:
        run.model.set_requires_gradient_sync(sync)
    elif run.world > 1 and not sync:
        return run.model.no_sync()
    return nullcontext()


def after_step(run: Run) -> None:
    """What follows a step: log, evaluate, pictures, checkpoint (each at its interval; the
    last step's are :func:`finish`'s)."""
    step, total = run.state.step, run.spec.total_steps
    if _logging_step(run, step):
        check_finite(run)
        run.metrics = log_window(run)
    if step == total:
        return
    if run.spec.eval_every and step % run.spec.eval_every == 0:
        # reported too, so a sweep's scheduler sees the evaluation as it happens
        ray.train.report({**evaluate(run), "stage": run.stage, "step": step, "final": 0})
    if step in run.task.picture_steps(total):
        pictures(run, final=False)
    if step % run.config.checkpoint_every_steps == 0:
        check_finite(run)
        save_checkpoint(run, run.metrics)


def next_epoch(run: Run, stepped: bool) -> None:
    if not stepped and run.state.position == 0:
        raise RuntimeError(
            f"stage {run.stage}: epoch {run.state.epoch} gave the workers no complete optimizer step; "
            "the dataset is smaller than one global batch (lower batch_size or add data)"
        )
    run.state.epoch += 1
    run.state.step_in_epoch = 0
    run.state.position = 0


def finish(run: Run) -> None:
    check_finite(run)
    final_metrics = evaluate(run)
    if run.state.best is not None:
        final_metrics[f"{run.task.headline}_best"] = run.state.best
        if run.logger:
            run.logger.metrics({f"{run.task.headline}_best": run.state.best}, run.state.step)
    pictures(run, final=True)
    # a sweep's scheduler decides at the evaluations along the way, not at the end
    final_metrics.pop("evaluations", None)
    save_checkpoint(run, {**run.metrics, **final_metrics}, final=True)


def pictures(run: Run, final: bool) -> None:
    """Rank 0 logs the task's pictures; a sharded model's forward takes every worker."""
    if run.logger or run.sharded:
        paths = run.task.pictures(unwrap(run.model), run.state.step, final, run.out_dir)
        if run.logger:
            run.logger.artifacts(paths, "pictures")


def evaluate(run: Run) -> dict[str, float]:
    """The task's evaluation, logged at the step with the training FLOPs spent so far (so
    accuracy plots against FLOPs) and the time evaluations took in all."""
    started = time.perf_counter()
    evaluation = run.task.evaluate(run.model)
    state = run.state
    state.eval_seconds += time.perf_counter() - started
    note_best(run, evaluation)
    if evaluation:
        state.evaluations += 1
        evaluation.update({"evaluations": state.evaluations, "time/eval_s": state.eval_seconds,
                           "flops/train_total": _flops(run)})
        if run.logger:  # at a logging step the training metrics hold the FLOPs already
            logged = {k: v for k, v in evaluation.items() if k != "flops/train_total" or not _logging_step(run, state.step)}
            run.logger.metrics(logged, state.step)
    return evaluation


# ----------------------------------------------------------------------------- logging and checks


def _logging_step(run: Run, step: int) -> bool:
    return step % run.spec.log_every == 0 or step == run.spec.total_steps


def log_window(run: Run) -> dict[str, float]:
    """The window's training metrics (loss averaged over every worker's micro-batches), data
    quality (rank 0 judges the skip counts; every rank stops with it), logged by rank 0."""
    window, state, spec = run.window, run.state, run.spec
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    names = sorted(window.sums)
    sums = all_reduce(torch.stack([*(window.sums[n] for n in names), torch.tensor(float(window.micro), device=run.device)]))
    metrics = {
        **{name: (value / sums[-1]).item() for name, value in zip(names, sums)},
        "train/lr": max(group["lr"] for group in run.optimizer.param_groups),
        "train/grad_norm": window.grad_norm.item(),
        "train/images_per_s": window.images * run.world / elapsed,
        "train/data_wait_frac": window.wait / elapsed,
        "train/epoch": state.epoch + state.step_in_epoch / max(spec.steps_per_epoch, 1),
        "flops/train_total": _flops(run),
        "time/device_hours": state.device_seconds / 3600,
        FINGERPRINT_METRIC: float(state.fingerprint),
    }
    problem = None
    if run.rank == 0 and spec.skips is not None:
        snapshot = spec.skips.snapshot()
        metrics["data/images_attempted"] = snapshot["attempted"]
        metrics["data/images_converted"] = snapshot["converted"]
        metrics.update({f"data/skipped_{reason}": n for reason, n in snapshot["skipped"].items()})
        try:
            check_skip_threshold(snapshot, run.config.data.max_skip_fraction)
        except DataQualityError as exc:
            problem = f"stage {run.stage}: {exc}"
    if int(all_reduce(torch.tensor(int(problem is not None), device=run.device), dist.ReduceOp.MAX).item()):
        raise StopTraining(problem or "stopped by rank 0: too many images skipped")
    if run.logger:
        run.logger.metrics(metrics, state.step)
    window.reset()
    return metrics


def _flops(run: Run) -> float:
    """Training FLOPs so far, with what the stage counts from before it (BEiT: its tokenizer's)."""
    return run.spec.flops_before + run.state.images_seen * run.spec.train_flops_per_image


def check_finite(run: Run) -> None:
    first_bad = int(all_reduce(run.bad_step, dist.ReduceOp.MAX).item())
    if first_bad >= 0:
        raise StopTraining(
            f"stage {run.stage}: loss became non-finite at step {first_bad}; stopped without saving. "
            f"Last good checkpoint: {run.last_good or 'none (diverged before the first checkpoint)'}."
        )


def note_best(run: Run, evaluation: dict[str, float]) -> None:
    value = evaluation.get(run.task.headline) if run.task.headline else None
    if value is not None and (run.state.best is None or value > run.state.best):
        run.state.best = value
