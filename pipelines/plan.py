"""The bill before launching: per stage FLOPs, optimizer steps, device-hours, the memory of one
worker, and the CPU cores its data decoding needs.

Steps and FLOPs come from the functions the stages use (``pipelines.stages.prepare``), FLOPs
counted with torch's counter on the meta device. Image counts come from the data when it is
on this machine, else from the stage's ``data.num_images``. Device-hours need a throughput
per device: given per stage (``--throughput pretrain=1520``), read from a
``benchmarks/pretrain_throughput.py`` JSON, or derived from an achieved TFLOP/s
(``--tflops``); without one the hours and the decode cores are left out. Memory per worker:
:mod:`pipelines.worker_memory`, over the costs :mod:`pipelines.memory` measures. Stages whose
models are the same (the classification stages of a config) are measured once, and a model's
price is kept for the next plan (a user edits batch sizes, epochs and workers between plans,
which leave the models as they are).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional

from rich.table import Table

from pipelines.config import PipelineConfig
from pipelines.stage_config import DetectStage, PretrainStage, SegmentStage, StageBase
from pipelines.memory import model_costs
from pipelines.worker_memory import GIB, ModelCosts, WorkerMemory, worker_memory
from pipelines.stages.prepare import schedule, stage_flops

#: Images one CPU core decodes per second on the pretraining path (a 500x375 JPEG decoded,
#: cropped and flipped into pairs; Ray Data), by output size, measured by
#: ``benchmarks/data_throughput.py`` on one core (the README's data figures).
DECODE_PER_CORE = {224: 373.0, 512: 187.0, 1024: 70.0}

#: Stage fields that change neither the model nor its cost per image: stages that differ only
#: in these share one measurement.
_NOT_THE_MODEL = {
    "data", "epochs", "max_steps", "batch_size", "accum_steps", "base_lr", "min_lr", "warmup_epochs", "weight_decay",
    "betas", "clip_grad", "seed", "log_every_steps", "checkpoint_every_steps", "scaling", "init", "eval_every_epochs",
    "pictures", "reconstructions", "grad_checkpointing", "layer_decay", "optimizer",
}


@dataclass
class StageBill:
    stage: str
    task: str
    model: str
    img_size: int
    gflops: float
    """Multiply-adds of one forward at the input size (encoder + head for pretraining)."""
    train_flops_per_image: float
    images_per_epoch: int
    steps: int
    images: int
    train_flops: float
    throughput: Optional[float]
    """Images per second per device the hours assume (None: unknown)."""
    device_hours: Optional[float]
    wall_hours: Optional[float]
    throughput_source: str
    memory: WorkerMemory
    """One worker's memory."""
    decode_per_core: float
    """Images per second one core decodes at this stage's size (``DECODE_PER_CORE``)."""
    decode_size: int
    """The image size whose figure ``decode_per_core`` is."""
    cores_per_device: Optional[float]
    """CPU cores one device needs at ``throughput``: its decoding and one for the training process."""
    cpus_per_worker: float
    monitor_flops: Optional[float] = None
    """What the k-NN monitor's evaluations cost in all (forwards of its images; None: no monitor,
    or its data is not on this machine and ``max_images`` is not set)."""

    def as_dict(self) -> dict:
        return {**asdict(self), "memory": self.memory.as_dict()}

    def fits(self, gpu_mem_gib: float, checkpointing: Optional[bool] = None) -> float:
        """GiB left on a device of ``gpu_mem_gib`` (negative: short by that much)."""
        return gpu_mem_gib - self.memory.total(checkpointing) / GIB

    def cpu_warning(self) -> Optional[str]:
        if self.cores_per_device is None or self.cores_per_device <= self.cpus_per_worker:
            return None
        return (
            f"{self.stage}: at {self.throughput:,.0f} img/s per device its data needs {self.cores_per_device:.1f} CPU "
            f"cores per device ({self.throughput / self.decode_per_core:.1f} decoding at {self.decode_per_core:.0f} "
            f"img/s per core, the {self.decode_size}-px figure, and one for the training process); "
            f"scaling.cpus_per_worker is {self.cpus_per_worker:g}: raise it, or expect the GPUs to wait for data"
        )


def decode_rate(img_size: int) -> tuple[float, int]:
    """(images/s per core, the size measured): the figure of the smallest measured size that
    is at least ``img_size``, the largest one beyond them."""
    size = min((s for s in DECODE_PER_CORE if s >= img_size), default=max(DECODE_PER_CORE))
    return DECODE_PER_CORE[size], size


def _images(config: PipelineConfig, name: str, stage: StageBase) -> int:
    if stage.data.num_images:
        return stage.data.num_images
    from pipelines.pipeline import synthetic_roots
    from pipelines.stages.prepare import StageContext, resolve_source, split_size

    ctx = StageContext(config, "", "", "plan", Path(config.storage).resolve() / "plan", synthetic_roots(config))
    return split_size(resolve_source(ctx, name, stage.data), stage.data.train_split, name)


def _monitor_flops(config: PipelineConfig, stage: PretrainStage, steps: int, macs: float) -> Optional[float]:
    """The monitor's cost: at each evaluation, one forward (2 FLOPs per multiply-add) of its
    train and validation images, each cut to ``max_images``."""
    from pipelines.stages.prepare import eval_every, schedule

    monitor = stage.monitor
    try:
        counts = [_split_images(config, monitor.data, split) for split in (monitor.data.train_split, monitor.data.val_split)]
    except (OSError, ValueError):
        counts = [None, None]
    if monitor.max_images:
        counts = [min(n, monitor.max_images) if n else monitor.max_images for n in counts]
    if None in counts:
        return None
    every = eval_every(stage, schedule("pretrain", stage, _images(config, "pretrain", stage)))
    evaluations = 1 + ((steps - 1) // every if every else 0)
    return evaluations * sum(counts) * 2 * macs


def _split_images(config: PipelineConfig, data, split: str) -> int:
    from pipelines.pipeline import synthetic_roots
    from pipelines.stages.prepare import StageContext, resolve_source

    ctx = StageContext(config, "", "", "plan", Path(config.storage).resolve() / "plan", synthetic_roots(config))
    return resolve_source(ctx, "pretrain_monitor", data).table(split, ["image_id"]).num_rows


def _head_classes(stage: StageBase) -> int:
    """Classes of the head the bill prices: the task's own where the config says, else
    ImageNet's 1000 (COCO's 80 for detection); a head's share of the FLOPs is negligible."""
    if isinstance(stage, SegmentStage):
        return stage.num_classes
    return 80 if isinstance(stage, DetectStage) else 1000


def _model_key(config: PipelineConfig, stage: StageBase) -> str:
    """The model and what its costs depend on; on a GPU it runs another attention kernel (and with ``fast``, bf16)."""
    fields = stage.model_dump(mode="json", exclude=_NOT_THE_MODEL)
    return json.dumps([config.stage_model(stage), stage.scaling.use_gpu, fields], sort_keys=True)


def _price(config: PipelineConfig, name: str, stage: StageBase, part: str) -> "dict[str, float] | ModelCosts":
    """A stage model's FLOPs (``part`` "flops") or memory costs ("costs")."""
    if part == "flops":
        return stage_flops(config, name, stage, _head_classes(stage))
    return model_costs(config, name, stage, _head_classes(stage))


def _cache_file(key: str) -> Path:
    """Where the price of the model ``key`` is kept between plans (in ``$MIXMAE_CACHE_DIR``, by
    default ``$XDG_CACHE_HOME/mixmae`` or ``~/.cache/mixmae``): named by the key and by the
    code that prices it."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixmae"
    root = Path(os.environ.get("MIXMAE_CACHE_DIR") or default) / "plan"
    return root / (hashlib.sha256(f"{key}\n{_code_version()}".encode()).hexdigest() + ".json")


@lru_cache(maxsize=1)
def _code_version() -> str:
    """What a price depends on besides the model key: this project's source (any change to it
    prices again) and the versions of torch, timm and torchvision."""
    import timm
    import torch
    import torchvision

    digest = hashlib.sha256(f"{torch.__version__} {timm.__version__} {torchvision.__version__}".encode())
    root = Path(__file__).resolve().parent.parent
    for path in sorted([*root.glob("mixmae_core/**/*.py"), *root.glob("pipelines/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _cached_price(key: str) -> Optional[tuple[dict[str, float], ModelCosts]]:
    try:
        stored = json.loads(_cache_file(key).read_text())
        return stored["flops"], ModelCosts.from_dict(stored["costs"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: price it
        return None


def _keep_price(key: str, flops: dict[str, float], costs: ModelCosts) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "flops": flops, "costs": asdict(costs)}))
        partial.replace(path)
    except OSError:  # a read-only home: the next plan prices again
        pass


def _priced_models(config: PipelineConfig, keys: dict[str, str]) -> Iterator[tuple[str, tuple]]:
    """``(key, (flops, costs))`` of every distinct model of the stages (``keys``: stage name to
    model key): first those an earlier plan priced with this code (:func:`_cache_file`), then
    the rest as each is done, kept for the next plan."""
    first: dict[str, str] = {}
    for name, key in keys.items():
        first.setdefault(key, name)
    fresh = {}
    for key, name in first.items():
        cached = _cached_price(key)
        if cached is None:
            fresh[key] = name
        else:
            yield key, cached
    for key, (flops, costs) in _price_models(config, fresh):
        _keep_price(key, flops, costs)
        yield key, (flops, costs)


def _price_models(config: PipelineConfig, first: dict[str, str]) -> Iterator[tuple[str, tuple]]:
    """``(key, (flops, costs))`` of each model ``key`` (priced as stage ``first[key]`` builds
    it), as each is done. Its FLOPs and its memory are priced apart, side by side in forked
    processes, one per core (each costs a second or two of Python dispatch in torch's meta
    kernels, and a fork starts with every import done), the largest models first:
    pretraining, then by image size."""
    stages = config.all_stages()
    order = sorted(first, key=lambda key: (stages[first[key]].task != "pretrain", -stages[first[key]].img_size))
    jobs = [(key, part) for key in order for part in ("costs", "flops")]
    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    done: dict[str, dict[str, object]] = {}
    if workers >= 2 and "fork" in multiprocessing.get_all_start_methods():
        for task in {stage.task for stage in stages.values()} - {"pretrain"}:
            importlib.import_module(f"pipelines.stages.{task}")  # once, before the forks, not in each
        gc.freeze()  # the imports' objects: no collection in the forks walks them again (a third of their time)
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_price, config, first[key], stages[first[key]], part): (key, part)
                           for key, part in jobs}
                for future in as_completed(futures):
                    key, part = futures[future]
                    done.setdefault(key, {})[part] = future.result()
                    if len(done[key]) == 2:
                        yield key, (done[key]["flops"], done[key]["costs"])
        except RuntimeError as exc:
            # torch refuses autograd in a fork of a process whose autograd has run a compiled graph
            # (a notebook, a test session): what is left is priced here, one model after another
            if "fork-based multiprocessing" not in str(exc):
                raise
        finally:
            gc.unfreeze()
    for key in order:
        if len(done.get(key, {})) < 2:
            yield key, tuple(_price(config, first[key], stages[first[key]], part) for part in ("flops", "costs"))


def bill(
    config: PipelineConfig,
    throughput: Optional[dict[str, float]] = None,
    tflops: Optional[float] = None,
    benchmark: Optional[Path] = None,
    priced: Optional[Callable[[StageBill], None]] = None,
) -> list[StageBill]:
    """Every stage's bill, in config order; ``priced`` is called with each as soon as it is done."""
    throughput = dict(throughput or {})
    measured = None
    if benchmark is not None:
        result = json.loads(Path(benchmark).read_text())
        measured = result, max(row["img_per_s"] for row in result["rows"].values())
    stages = config.all_stages()
    images_per_epoch, steps = {}, {}
    for name, stage in stages.items():  # a stage the data cannot fill fails here, before any pricing
        images_per_epoch[name] = _images(config, name, stage)
        steps[name] = schedule(name, stage, images_per_epoch[name]).total_steps
    keys = {name: _model_key(config, stage) for name, stage in stages.items()}
    out = {}
    for key, (flops, costs) in _priced_models(config, keys):
        for name in (name for name, k in keys.items() if k == key):
            stage = stages[name]
            macs = 1e9 * flops.get("flops/encoder_gmacs", flops.get("flops/task_gmacs"))
            per_image = flops["flops/train_per_image"]
            images = steps[name] * stage.batch_size
            rate, source = throughput.get(name), "given"
            if rate is None and measured and isinstance(stage, PretrainStage):
                result, best = measured
                if result["model"] == stage.model and result["img_size"] == stage.img_size:
                    rate, source = best, f"benchmark on {result['device']}"
            if rate is None and tflops:
                rate, source = tflops * 1e12 / per_image, f"{tflops:g} TFLOP/s achieved"
            device_hours = images / rate / 3600 if rate else None
            per_core, decode_size = decode_rate(stage.img_size)
            out[name] = StageBill(
                stage=name, task=stage.task, model=config.stage_model(stage), img_size=stage.img_size,
                gflops=macs / 1e9, train_flops_per_image=per_image, images_per_epoch=images_per_epoch[name],
                steps=steps[name], images=images, train_flops=images * per_image, throughput=rate,
                device_hours=device_hours,
                wall_hours=device_hours / stage.scaling.num_workers if device_hours else None,
                throughput_source=source if rate else "none", memory=worker_memory(stage, costs),
                decode_per_core=per_core, decode_size=decode_size,
                cores_per_device=1 + rate / per_core if rate else None, cpus_per_worker=stage.scaling.cpus_per_worker,
                monitor_flops=_monitor_flops(config, stage, steps[name], macs) if getattr(stage, "monitor", None) else None,
            )
            if priced:
                priced(out[name])
    return [out[name] for name in stages]


MEMORY_NOTE = (
    "GiB of tensor memory per worker, an upper bound (gradients counted beside every activation); weights, "
    "gradients and optimizer states in fp32 whatever the autocast (AdamW: 2 states, 8 bytes per trainable parameter; "
    "the fused AdamW steps in place, the foreach one holds up to one more fp32 copy while it steps); activations "
    "measured on the meta device, eager (torch.compile keeps less); the CUDA context is not included"
)


def verdict(b: StageBill, gpu_mem: float) -> str:
    """Whether the config's choice of checkpointing fits, and if not, whether checkpointing would."""
    margin = b.fits(gpu_mem)
    if margin >= 0:
        return f"[green]fits, {margin:.1f} spare[/]"
    other = b.fits(gpu_mem, True)
    hint = ""
    if other >= 0 and not b.memory.checkpointing:
        hint = f"; fits with grad_checkpointing: true ({other:.1f} spare)"
    return f"[red]does not fit: {-margin:.1f} short{hint}[/]"


def memory_table(title: str, bills: list[StageBill], gpu_mem: Optional[float]) -> Table:
    """One worker's memory per stage; the total of the config's checkpointing choice in bold."""
    table = Table(title=title)
    for column in ("stage", "micro-batch", "autocast", "weights", "grads", "DDP buckets", "optimizer", "activations",
                   "checkpointed", "total", "total checkpointed"):
        table.add_column(column, justify="left" if column in ("stage", "autocast") else "right")
    if gpu_mem:
        table.add_column(f"on {gpu_mem:g} GiB")
    for b in bills:
        m = b.memory
        totals = [f"{m.total(on) / GIB:.1f}" for on in (False, True)]
        totals[m.checkpointing] = f"[bold]{totals[m.checkpointing]}[/]"
        table.add_row(
            b.stage, str(m.micro_batch), "bf16" if m.bf16 else "fp32", f"{m.weights / GIB:.2f}",
            f"{m.gradients / GIB:.2f}", f"{m.ddp_buckets / GIB:.2f}", f"{m.optimizer / GIB:.2f} {m.optimizer_kind}",
            f"{m.activations / GIB:.1f}", f"{m.activations_checkpointed / GIB:.1f} ({m.checkpointed_blocks} blocks)",
            *totals, *([verdict(b, gpu_mem)] if gpu_mem else []),
        )
    return table
