"""The training loop every stage runs inside its Ray Train workers.

A stage supplies a :class:`Task` (model, optimizer, micro-batches, loss, optional
evaluation and pictures) built from its :class:`~pipelines.stages.jobs.StageJob`; this
module owns what they share: gradient accumulation and clipping, the per-step schedule,
rank-0 MLflow logging, throughput / data-wait / FLOPs accounting, skipped-image counts,
checkpoints through ``ray.train.report`` and resuming from them, and the non-finite-loss
guard.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn as nn

from mixmae_core.checkpoint import save_state_dict
from mixmae_core.optim import build_scheduler
from pipelines.data.quality import DataQualityError, check_skip_threshold
from pipelines.data.transforms import seed_global_rngs
from pipelines.stages.jobs import LoopSpec, StageJob
from pipelines.spool import Spool
from pipelines.stages.checkpoints import (
    CORRUPT_DIR, ENCODER_FILE, META_FILE, MODEL_FILE, STATE_FILE, Loaded, newest_loadable,
)
from pipelines.tracking import (
    CHECKPOINT, COMPLETE, ENCODER, FAILED_REASON, RunLogger, run_spool, spooled_step, system_metrics,
)

LOSS_METRIC = "train/loss"
SKIPPED_CHECKPOINTS = "mixmae.skipped_checkpoints"
PREEMPTED = "mixmae.preempted"
#: how long a worker's sender may go on delivering after training; the driver delivers the rest
#: (and a sender that already finds the server away hands over at once: the driver waits anyway)
WORKER_DELIVERY_WAIT_S = 10.0
worker_log = logging.getLogger(__name__)


class Resume:
    """The checkpoint a worker group resumes from, read once per group start (a pretraining
    checkpoint with its optimizer state is several times the model's size)."""

    def __init__(self) -> None:
        latest = ray.train.get_checkpoint()
        #: checkpoints passed over, as ``"<name>: <why>"``; rank 0 keeps copies of them
        self.skipped: list[str] = []
        keep_corrupt = ray.train.get_context().get_world_rank() == 0
        self.found = newest_loadable(Path(latest.path), self.skipped, keep_corrupt) if latest else None

    def first_to_run(self, stages: list[str]) -> int:
        """Index of the first of the group's ``stages`` to run: the one the checkpoint belongs
        to (it resumes; a final checkpoint just finishes again), else the first."""
        stage = self.found.meta.get("stage") if self.found else None
        return stages.index(stage) if stage in stages else 0

    def take(self, stage: str) -> tuple[Optional[Loaded], list[str]]:
        """The checkpoint if it is ``stage``'s (None otherwise) and those passed over, handed
        out once: the first stage to run reports them, and the tensors are freed once restored."""
        found, skipped, self.found, self.skipped = self.found, self.skipped, None, []
        return (found if found is not None and found.meta.get("stage") == stage else None), skipped


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    images_seen: int = 0
    device_seconds: float = 0.0
    best: Optional[float] = None
    """The best evaluation of the task's headline metric so far (the official scripts report it)."""


class StopTraining(Exception):
    """A condition on which every rank stops and the stage fails without a retry: retrying
    from the last checkpoint would meet it again (a diverged loss, too many bad images)."""


class StopAsked(Exception):
    """The driver was asked to stop (SIGTERM): every rank saved a checkpoint at this step."""


class Task:
    """What a stage plugs into :func:`train`. Methods run on every worker unless noted."""

    headline: Optional[str] = None
    """The evaluation metric whose best value is also logged (as ``<headline>_best``)."""

    def __init__(self, job: StageJob):
        self.job = job
        self.spec = job.spec
        self.device = torch.device("cpu")

    def build(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def micro_batches(self, epoch: int) -> Iterator[Any]:
        """This worker's micro-batches of ``epoch`` (already on the device)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Scalar loss of a micro-batch and its number of images."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (every rank takes part; reduced across ranks)."""
        return {}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        """Rank 0 only: pictures to log at ``step``."""
        return []

    def picture_steps(self, total_steps: int) -> set[int]:
        return set()

    def export(self, model: nn.Module, out: Path) -> None:
        """Rank 0 only: write ``encoder.safetensors`` (weights a later stage starts from)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _reduce(values: torch.Tensor, op=None, group=None) -> torch.Tensor:
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM, group=group)
    return values


@functools.cache
def _host_group():
    """A process group over CPU tensors (gloo) for what ranks agree on every step: agreeing
    through NCCL would make each step wait for the GPU to finish the previous one. One per
    worker process, whatever the number of stages its group trains."""
    if world_size() == 1 or dist.get_backend() == dist.Backend.GLOO:
        return None
    return dist.new_group(backend=dist.Backend.GLOO)


class _Checkpointer:
    def __init__(self, task: Task, model: nn.Module, optimizer, scheduler, rank: int, spec: LoopSpec,
                 logger: Optional[RunLogger]):
        self.task, self.model, self.optimizer, self.scheduler = task, model, optimizer, scheduler
        self.rank, self.spec, self.logger = rank, spec, logger
        self.last_good: Optional[str] = None
        self.started = time.perf_counter()

    def restore(self, state: TrainState, found: Optional[Loaded]) -> bool:
        if found is None:
            return False
        _unwrap(self.model).load_state_dict(found.model)
        self.optimizer.load_state_dict(found.trainer["optimizer"])
        self.scheduler.load_state_dict(found.trainer["scheduler"])
        for key, value in found.trainer["train_state"].items():
            setattr(state, key, value)
        rngs = found.trainer["rng"]
        _set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.last_good = f"step {state.step}"
        return True

    def save(self, state: TrainState, metrics: dict[str, float], final: bool = False) -> None:
        """Every rank calls this (``ray.train.report`` is a barrier); rank 0 writes."""
        rngs = all_gather(_rng_state())
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                d = Path(tmp)
                save_state_dict(d / MODEL_FILE, _unwrap(self.model).state_dict())
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "train_state": asdict(state),
                        "rng": rngs,
                    },
                    d / STATE_FILE,
                )
                (d / META_FILE).write_text(json.dumps({"stage": self.spec.stage, **asdict(state), "final": final}))
                if final:
                    self.task.export(_unwrap(self.model), d)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": state.step, "final": int(final)}, checkpoint=checkpoint)
            if final and self.logger is not None:
                self._record_finished(Path(ray.train.get_checkpoint().path))
        self.last_good = f"step {state.step}"

    def _record_finished(self, persisted: Path) -> None:
        """Mark the stage finished on its MLflow run: the driver, and every later run of the
        pipeline, read the outcome from these tags. The files are the persisted checkpoint's,
        which stay until delivered."""
        from pipelines import stage_model  # defines the pyfunc model when imported

        logger = self.logger
        logger.metrics({"time/wall_s": time.perf_counter() - self.started}, self.spec.total_steps)
        logger.artifacts(sorted(persisted.iterdir()), "checkpoint", lasting=True)
        encoder = persisted / ENCODER_FILE
        if encoder.exists():
            logger.model(stage_model.job_config(self.task.job), encoder)
        logger.tags({COMPLETE: "true", CHECKPOINT: str(persisted), ENCODER: str(encoder) if encoder.exists() else "",
                     "mixmae.meta": META_FILE})


class _Window:
    """Accumulates what a logging step reports."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.start = now
        self.wait = 0.0
        self.images = 0
        self.loss_sum: Optional[torch.Tensor] = None
        self.micro = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        detached = loss.detach().float()
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        self.micro += 1


def train(task: Task, resume: Resume) -> None:
    """Run (or resume from ``resume``) a stage's training in this Ray Train worker.

    Rank 0 logs to MLflow through a spool in the pipeline's storage (and so does the first
    worker of every other node, with its node's system metrics): training never waits on
    the tracking server, and what the server missed is delivered when it answers again. A
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

    def spool(part: str = "") -> Spool:
        spools.append(run_spool(Path(spec.storage), spec.tracking_uri, spec.run_id, part, say=worker_log.warning).start())
        return spools[-1]

    logger = None
    if rank == 0:
        main = spool()
        logger = RunLogger(spec.tracking_uri, spec.run_id, spooled_step(main, LOSS_METRIC), spool=main)
    watching = spec.system_metrics_every_s is not None and context.get_local_rank() == 0  # one sampler a node
    try:
        with _node_metrics(spec, node, spools[0] if rank == 0 else spool(node or f"rank{rank}")) if watching else nullcontext():
            _train(task, spec, logger, resume)
    except StopTraining as exc:
        if logger is not None:
            logger.tags({FAILED_REASON: str(exc)})
    except StopAsked as exc:
        if logger is not None:
            logger.tags({PREEMPTED: str(exc)})
    finally:
        for each in spools:  # what is not delivered in time stays on disk for the driver
            each.close(0.0 if each.unreachable_since is not None else WORKER_DELIVERY_WAIT_S)


def _node_metrics(spec: LoopSpec, node: Optional[str], spool: Spool):
    series = f"system/{node}/cpu_utilization_percentage" if node else "system/cpu_utilization_percentage"
    logger = RunLogger(spec.tracking_uri, spec.run_id, spool=spool)
    return system_metrics(logger.metrics, node, spec.system_metrics_every_s, first_step=spooled_step(spool, series) + 1)


def _train(task: Task, spec: LoopSpec, logger: Optional[RunLogger], resume: Resume) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed_global_rngs(spec.seed * 1000 + rank)
    model = task.build(device)
    optimizer = task.optimizer(model, spec.lr)
    scheduler = build_scheduler(optimizer, spec.total_steps, spec.warmup_steps, spec.min_lr)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    state = TrainState()
    checkpointer = _Checkpointer(task, ddp_model, optimizer, scheduler, rank, spec, logger)
    found, skipped = resume.take(spec.stage)
    resumed = checkpointer.restore(state, found)
    del found
    skips = spec.skips if rank == 0 else None
    pictures = task.picture_steps(spec.total_steps)
    out_dir = Path(tempfile.mkdtemp(prefix=f"{spec.stage}-"))
    if logger and skipped:
        worker_log.warning("checkpoints that do not load were passed over (copies in %s): %s", CORRUPT_DIR, skipped)
        logger.tags({SKIPPED_CHECKPOINTS: "; ".join(skipped)})
    if logger and resumed:
        logger.tags({"mixmae.resumed_from": checkpointer.last_good})
    if logger and not resumed and 0 in pictures:
        logger.artifacts(task.pictures(_unwrap(ddp_model), 0, False, out_dir), "pictures")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.bf16 else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    window = _Window()
    stage_start = time.perf_counter()
    device_seconds0 = state.device_seconds

    def check_finite() -> None:
        first_bad = int(_reduce(bad_step, dist.ReduceOp.MAX).item())
        if first_bad >= 0:
            raise StopTraining(
                f"stage {spec.stage}: loss became non-finite at step {first_bad}; stopped without saving. "
                f"Last good checkpoint: {checkpointer.last_good or 'none (diverged before the first checkpoint)'}."
            )

    host_group = _host_group()

    def stop_asked() -> bool:
        """Whether the driver asked to stop; every rank gets the same answer at the same step."""
        asked = bool(spec.stop_file) and os.path.exists(spec.stop_file)
        return bool(int(_reduce(torch.tensor(int(asked)), dist.ReduceOp.MAX, host_group).item()))

    def check_data(reason: Optional[str]) -> None:
        """Rank 0 judges the skip counts; every rank must stop with it."""
        if int(_reduce(torch.tensor(int(reason is not None), device=device), dist.ReduceOp.MAX).item()):
            raise StopTraining(reason or "stopped by rank 0: too many images skipped")

    def log(extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - window.start, 1e-9)
        loss = _reduce(torch.stack([window.loss_sum, torch.tensor(float(window.micro), device=device)]))
        images = window.images * world
        metrics = {
            LOSS_METRIC: (loss[0] / loss[1]).item(),
            "train/lr": max(group["lr"] for group in optimizer.param_groups),
            "train/images_per_s": images / elapsed,
            "train/data_wait_frac": window.wait / elapsed,
            "train/epoch": state.epoch + state.step_in_epoch / max(spec.steps_per_epoch, 1),
            "flops/train_total": state.images_seen * spec.train_flops_per_image,
            "time/device_hours": state.device_seconds / 3600,
            **(extra or {}),
        }
        data_problem = None
        if skips is not None:
            snapshot = skips.snapshot()
            metrics["data/images_attempted"] = snapshot["attempted"]
            metrics["data/images_converted"] = snapshot["converted"]
            for reason, n in snapshot["skipped"].items():
                metrics[f"data/skipped_{reason}"] = n
            try:
                check_skip_threshold(snapshot, spec.max_skip_fraction)
            except DataQualityError as exc:
                data_problem = f"stage {spec.stage}: {exc}"
        check_data(data_problem)
        if logger:
            logger.metrics(metrics, state.step)
        window.reset(time.perf_counter())
        return metrics

    def note_best(evaluation: dict[str, float]) -> None:
        value = evaluation.get(task.headline) if task.headline else None
        if value is not None and (state.best is None or value > state.best):
            state.best = value

    metrics: dict[str, float] = {}
    while state.step < spec.total_steps:
        skip = state.step_in_epoch * spec.accum_steps
        resumed_in_epoch = skip > 0  # a checkpoint at an epoch's last step resumes with nothing left to do
        stepped = False
        batches = task.micro_batches(state.epoch)
        micro = 0
        while state.step < spec.total_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            window.wait += time.perf_counter() - t0
            if batch is None:
                break
            if skip:
                skip -= 1
                continue
            micro += 1
            last_micro = micro % spec.accum_steps == 0
            sync = ddp_model.no_sync() if (world > 1 and not last_micro) else nullcontext()
            with sync:
                with autocast:
                    loss, n_images = task.loss(ddp_model, batch)
                (loss / spec.accum_steps).backward()
            window.add_loss(loss)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), state.step + 1, bad_step)
            window.images += n_images
            state.images_seen += n_images * world
            if not last_micro:
                continue
            scheduler.step_update(state.step)
            logging_step = (state.step + 1) % spec.log_every == 0 or state.step + 1 == spec.total_steps
            grad_norm = None
            if spec.clip_grad or logging_step:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.clip_grad or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.step_in_epoch += 1
            state.device_seconds = device_seconds0 + (time.perf_counter() - stage_start) * world
            stepped = True
            if logging_step:
                check_finite()
                metrics = log({"train/grad_norm": grad_norm.item()})
            if spec.eval_every and state.step % spec.eval_every == 0 and state.step < spec.total_steps:
                evaluation = task.evaluate(ddp_model)
                note_best(evaluation)
                if logger:
                    logger.metrics(evaluation, state.step)
            if state.step in pictures and logger and state.step < spec.total_steps:
                logger.artifacts(task.pictures(_unwrap(ddp_model), state.step, False, out_dir), "pictures")
            checkpoint_step = state.step % spec.checkpoint_every == 0 and state.step < spec.total_steps
            if checkpoint_step:
                check_finite()
                checkpointer.save(state, metrics)
            if stop_asked():
                if not checkpoint_step:
                    check_finite()
                    checkpointer.save(state, metrics)
                raise StopAsked(f"step {state.step}")
        if state.step >= spec.total_steps:
            break
        if not stepped and not resumed_in_epoch:
            raise RuntimeError(
                f"stage {spec.stage}: epoch {state.epoch} gave this worker no complete optimizer step; "
                "the dataset is smaller than one global batch (lower batch_size or add data)"
            )
        state.epoch += 1
        state.step_in_epoch = 0
        optimizer.zero_grad(set_to_none=True)

    check_finite()
    final_metrics = task.evaluate(ddp_model)
    note_best(final_metrics)
    if state.best is not None:
        final_metrics[f"{task.headline}_best"] = state.best
    if logger:
        logger.metrics(final_metrics, state.step)
        logger.artifacts(task.pictures(_unwrap(ddp_model), state.step, True, out_dir), "pictures")
    checkpointer.save(state, {**metrics, **final_metrics}, final=True)
