"""One stage's training on one worker (:class:`Run`: model, optimizer, schedule, position in
the data, what trained since the last log), and the checkpoints that save and restore it."""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray.train
import torch
import torch.nn as nn

from mixmae_core.checkpoint import save_state_dict
from pipelines import storage
from pipelines.stages.checkpoints import ENCODER_FILE, META_FILE, MODEL_FILE, STATE_FILE, Loaded, newest_loadable
from pipelines.stages.distributed import all_gather, unwrap
from pipelines.stages.jobs import LoopSpec
from pipelines.stages.task import Task
from pipelines.tracking import CHECKPOINT, COMPLETE, ENCODER, RunLogger

LOSS_METRIC = "train/loss"
#: seconds between two looks at a stop request kept in an object store
STOP_POLL_S = 2.0


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
        ray.train.report({**metrics, "stage": run.stage, "step": run.state.step, "final": int(final)}, checkpoint=checkpoint)
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
