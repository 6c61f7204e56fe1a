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

import functools
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
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
from pipelines.data.order import Shard
from pipelines.data.quality import DataQualityError, check_skip_threshold
from pipelines import storage
from pipelines.data.transforms import seed_global_rngs
from pipelines.stages.jobs import LoopSpec, StageJob
from pipelines.spool import Spool
from pipelines.stages.checkpoints import (
    CORRUPT_DIR, ENCODER_FILE, META_FILE, MODEL_FILE, STATE_FILE, Loaded, newest_loadable,
)
from pipelines.tracking import (
    CHECKPOINT, COMPLETE, ENCODER, FAILED_REASON, RunLogger, delivered_step, run_spool, spooled_step, system_metrics,
)

LOSS_METRIC = "train/loss"
FINGERPRINT_METRIC = "data/fingerprint"
SKIPPED_CHECKPOINTS = "mixmae.skipped_checkpoints"
PREEMPTED = "mixmae.preempted"
#: how long a worker's sender may go on delivering after training; the driver delivers the rest
#: (and a sender that already finds the server away hands over at once: the driver waits anyway)
WORKER_DELIVERY_WAIT_S = 10.0
#: seconds between two looks at a stop request kept in an object store
STOP_POLL_S = 2.0
#: fingerprints are 48-bit, so MLflow's float64 metrics hold them exactly
_FINGERPRINT_BYTES = 6
worker_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- what a stage plugs in


@dataclass
class MicroBatch:
    """One worker's micro-batch, still on the CPU: what the task's loss takes, and which
    images (and units of the worker's shard) it holds."""

    inputs: Any
    image_ids: torch.Tensor
    positions: torch.Tensor


class Task:
    """What a stage plugs into :func:`train`. Methods run on every worker unless noted."""

    headline: Optional[str] = None
    """The evaluation metric whose best value is also logged (as ``<headline>_best``)."""
    images_per_unit = 1
    """Images in one unit of the stage's training data (pretraining reads pairs)."""
    logs_model = True
    """Whether the stage's final weights become an MLflow model (``pipelines/stage_model.py``)."""

    def __init__(self, job: StageJob):
        self.job = _local_weights(job)
        self.spec = job.spec
        self.device = torch.device("cpu")

    def build(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def batches(self, name: str, shard: Shard) -> Iterator[MicroBatch]:
        """This worker's micro-batches of dataset ``name`` (``train``, ``val``) in ``shard``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Scalar loss of a micro-batch (moved to the device here) at optimizer step ``step``,
        its number of images, and other scalars to log as ``train/<name>`` (averaged like the loss)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (every rank takes part; reduced across ranks)."""
        return {}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        """Rank 0 only: pictures to log at ``step``."""
        return []

    def picture_steps(self, total_steps: int) -> set[int]:
        return set()

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        """Rank 0 only: write ``encoder.safetensors`` (weights a later stage starts from) from
        ``state``, the model's whole state dict (gathered when the model is sharded)."""

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the workers (its forwards take every worker)."""
        return world_size() > 1 and self.spec.scaling.parallelism == "fsdp"

    def dataset(self, name: str, shard: Shard) -> "ray.data.Dataset":
        """Dataset ``name`` of the job, this worker's ``shard`` of it."""
        return self.job.data[name].build(shard, data_cpus(self.spec.scaling))

    def evaluation_shard(self) -> Shard:
        """This worker's contiguous slice of an evaluation split: every image scored once."""
        return Shard(rank=world_rank(), world=world_size())


def _local_weights(job: StageJob) -> StageJob:
    """``job`` with the weights it starts from on this node's disk: the model code reads files,
    and an earlier stage's encoder may be in a bucket."""
    local = {key: str(storage.local_copy(value)) for key in ("encoder_weights", "tokenizer_weights")
             if (value := getattr(job, key)) and storage.is_remote(value)}
    return replace(job, **local) if local else job


def data_cpus(scaling) -> float:
    """The CPUs one worker's decode tasks may plan with: the cluster's, less the stage's
    workers' own, shared among the workers (each executes its own dataset); at least one,
    so a decode task can always run."""
    spare = ray.cluster_resources().get("CPU", 1.0) - scaling.num_workers * scaling.cpus_per_worker
    return max(1.0, spare / scaling.num_workers)


class StopTraining(Exception):
    """A condition on which every rank stops and the stage fails without a retry: retrying
    from the last checkpoint would meet it again (a diverged loss, too many bad images)."""


class StopAsked(Exception):
    """The driver was asked to stop (SIGTERM): every rank saved a checkpoint at this step."""


class StopRequest:
    """Whether the driver asked the stages to stop: the file it writes on SIGTERM exists. A local
    file is looked at before every step; an object at most every :data:`STOP_POLL_S` seconds
    (a request per step would add a round trip to every step)."""

    def __init__(self, location: str):
        self.location = location
        self.every = STOP_POLL_S if storage.is_remote(location) else 0.0
        self.checked = -math.inf
        self.seen = False

    def asked(self) -> bool:
        if self.location and not self.seen and time.monotonic() - self.checked >= self.every:
            self.checked = time.monotonic()
            try:
                self.seen = storage.exists(self.location)
            except OSError:  # the store did not answer this time: the next poll asks again
                pass
        return self.seen


# ----------------------------------------------------------------------------- ranks


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


def _gather_ints(values: list[int]) -> torch.Tensor:
    """``values`` of every rank as a ``(world, len(values))`` int64 tensor (over the host group)."""
    mine = torch.tensor(values, dtype=torch.int64)
    if world_size() == 1:
        return mine[None]
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine, group=_host_group())
    return torch.stack(out)


def _chain(previous: int, data: bytes) -> int:
    digest = hashlib.blake2b(previous.to_bytes(8, "little") + data, digest_size=_FINGERPRINT_BYTES).digest()
    return int.from_bytes(digest, "little")


# ----------------------------------------------------------------------------- state and checkpoints


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    position: int = 0
    """Units of this worker's shard of the epoch trained on (where a resumed run reads on)."""
    images_seen: int = 0
    device_seconds: float = 0.0
    fingerprint: int = 0
    """The chain of every step's image ids so far (see :data:`FINGERPRINT_METRIC`)."""
    evaluations: int = 0
    eval_seconds: float = 0.0
    best: Optional[float] = None
    """The best evaluation of the task's headline metric so far (the official scripts report it)."""


class Resume:
    """The checkpoint a worker group resumes from, read once per group start (a pretraining
    checkpoint with its optimizer state is several times the model's size)."""

    def __init__(self) -> None:
        latest = ray.train.get_checkpoint()
        #: checkpoints passed over, as ``"<name>: <why>"``; rank 0 keeps copies of them
        self.skipped: list[str] = []
        keep_corrupt = ray.train.get_context().get_world_rank() == 0
        self.found = None
        if latest:
            self.found = newest_loadable(storage.location_of(latest.filesystem, latest.path), self.skipped, keep_corrupt)

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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's and torch.compile's wrappers (FSDP shards the model in place)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


@dataclass
class Run:
    """One stage in one worker: what the loop's steps share."""

    task: Task
    spec: LoopSpec
    logger: Optional[RunLogger]
    model: nn.Module
    """The model as trained (DDP-wrapped with several workers)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    rank: int
    world: int
    device: torch.device
    sharded: bool = False
    """Parameters, gradients and optimizer states sharded over the workers (``parallelism: fsdp``)."""
    last_good: Optional[str] = None
    """The newest checkpoint, as ``"step N"`` (named when a stage fails)."""
    saved_step: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged training metrics (a checkpoint carries them)."""
    window: "Window" = field(default_factory=lambda: Window())
    bad_step: Optional[torch.Tensor] = None
    """The first step whose loss was not finite (-1: none), kept on the device (no sync per step)."""
    stop: StopRequest = field(default_factory=lambda: StopRequest(""))
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="stage-")))
    started: float = field(default_factory=time.perf_counter)
    device_seconds0: float = 0.0

    @property
    def stage(self) -> str:
        return self.task.job.name

    @property
    def config(self):
        return self.task.spec

    @property
    def accum(self) -> int:
        return self.config.accum_steps


def save_checkpoint(run: Run, metrics: dict[str, float], final: bool = False) -> None:
    """Every rank calls this (``ray.train.report`` is a barrier; a sharded model's state is
    gathered); rank 0 writes. The meta file holds the whole training state (each worker's
    position included): what resuming needs apart from tensors, readable without loading them."""
    rngs = all_gather(_rng_state())
    positions = all_gather(run.state.position)
    model_state, optimizer_state = whole_state(run)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if run.rank == 0:
            d = Path(tmp)
            save_state_dict(d / MODEL_FILE, model_state)
            trainer = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(), "rng": rngs}
            torch.save(trainer, d / STATE_FILE)
            meta = {"stage": run.stage, **asdict(run.state), "positions": positions, "final": final}
            (d / META_FILE).write_text(json.dumps(meta))
            if final:
                run.task.export(unwrap(run.model), model_state, d)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "step": run.state.step, "final": int(final)}, checkpoint=checkpoint)
        if final and run.logger is not None:
            persisted = ray.train.get_checkpoint()
            _record_finished(run, storage.location_of(persisted.filesystem, persisted.path))
    run.last_good, run.saved_step = f"step {run.state.step}", run.state.step


def whole_state(run: Run) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's and the optimizer's state dicts, whole (rank 0's, when gathered from shards)."""
    if not run.sharded:
        return unwrap(run.model).state_dict(), run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(run.model, options=options),
            get_optimizer_state_dict(run.model, run.optimizer, options=options))


def load_whole_state(run: Run, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """:func:`whole_state`'s inverse: every rank passes the whole state, a sharded model keeps its shard."""
    if not run.sharded:
        unwrap(run.model).load_state_dict(model_state)
        run.optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(run.model, model_state, options=options)
    set_optimizer_state_dict(run.model, run.optimizer, optimizer_state, options=options)


def restore(run: Run, found: Loaded) -> None:
    """Continue from ``found``: weights, optimizer, schedule, random generators, and this
    worker's position in the epoch (a group of another size cannot read the same images:
    it reads on from the same share of the epoch)."""
    meta = found.meta
    if "positions" not in meta:
        raise RuntimeError(
            f"{found.path} was written before checkpoints recorded where each worker was in its data; resume it "
            "with the version of mixmae that wrote it, or start the stage afresh (give the pipeline another name)"
        )
    load_whole_state(run, found.model, found.trainer["optimizer"])
    run.scheduler.load_state_dict(found.trainer["scheduler"])
    for key in asdict(run.state):
        setattr(run.state, key, meta[key])
    positions = meta["positions"]
    run.state.position = positions[run.rank] if len(positions) == run.world else sum(positions) // run.world
    rngs = found.trainer["rng"]
    _set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0])
    run.last_good, run.saved_step = f"step {run.state.step}", run.state.step


def _record_finished(run: Run, persisted: str) -> None:
    """Mark the stage finished on its MLflow run: the driver, and every later run of the
    pipeline, read the outcome from these tags. The files are the persisted checkpoint's
    (in a folder or a bucket), which stay until delivered."""
    from pipelines import stage_model  # defines the pyfunc model when imported

    logger = run.logger
    logger.metrics({"time/wall_s": time.perf_counter() - run.started}, run.spec.total_steps)
    logger.artifacts(storage.files(persisted), "checkpoint", lasting=True)
    encoder = storage.join(persisted, ENCODER_FILE)
    exported = storage.exists(encoder)
    if exported and run.task.logs_model:
        logger.model(stage_model.job_config(run.task.job), encoder)
    logger.tags({COMPLETE: "true", CHECKPOINT: persisted, ENCODER: encoder if exported else "", "mixmae.meta": META_FILE})


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


def shard(model: nn.Module, device: torch.device) -> None:
    """Shard ``model`` over the workers in place (torch's ``fully_shard``, FSDP2): each of
    :func:`~pipelines.memory.sharding_units` gathered for its forward and backward, then the rest.
    Every worker starts from rank 0's weights, as under DDP (each built its own, from its own seed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pipelines.memory import sharding_units

    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (world_size(),))
    for unit in sharding_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


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
        agreed = _gather_ints([int(len(batches) < run.accum), int(asked), _chain(0, ids)])
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
        ray.train.report({**evaluate(run), "step": step, "final": 0})
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


class Window:
    """What trained since the last logging step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.images = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.grad_norm: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, images: int, extra: dict[str, torch.Tensor]) -> None:
        """A micro-batch's loss and other scalars, summed on their device (no sync per step)."""
        for name, value in {LOSS_METRIC: loss, **{f"train/{k}": v for k, v in extra.items()}}.items():
            value = value.detach().float().to(loss.device)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro += 1
        self.images += images


def _logging_step(run: Run, step: int) -> bool:
    return step % run.spec.log_every == 0 or step == run.spec.total_steps


def log_window(run: Run) -> dict[str, float]:
    """The window's training metrics (loss averaged over every worker's micro-batches), data
    quality (rank 0 judges the skip counts; every rank stops with it), logged by rank 0."""
    window, state, spec = run.window, run.state, run.spec
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    names = sorted(window.sums)
    sums = _reduce(torch.stack([*(window.sums[n] for n in names), torch.tensor(float(window.micro), device=run.device)]))
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
    if int(_reduce(torch.tensor(int(problem is not None), device=run.device), dist.ReduceOp.MAX).item()):
        raise StopTraining(problem or "stopped by rank 0: too many images skipped")
    if run.logger:
        run.logger.metrics(metrics, state.step)
    window.reset()
    return metrics


def _flops(run: Run) -> float:
    """Training FLOPs so far, with what the stage counts from before it (BEiT: its tokenizer's)."""
    return run.spec.flops_before + run.state.images_seen * run.spec.train_flops_per_image


def check_finite(run: Run) -> None:
    first_bad = int(_reduce(run.bad_step, dist.ReduceOp.MAX).item())
    if first_bad >= 0:
        raise StopTraining(
            f"stage {run.stage}: loss became non-finite at step {first_bad}; stopped without saving. "
            f"Last good checkpoint: {run.last_good or 'none (diverged before the first checkpoint)'}."
        )


def note_best(run: Run, evaluation: dict[str, float]) -> None:
    value = evaluation.get(run.task.headline) if run.task.headline else None
    if value is not None and (run.state.best is None or value > run.state.best):
        run.state.best = value
