"""The bill before launching: per stage FLOPs, optimizer steps and estimated device-hours.

FLOPs are measured with torch's counter on the real models (the same numbers the stages
log). Image counts come from the data when it is on this machine, else from the stage's
``data.num_images``. Device-hours need a throughput per device: given per stage
(``--throughput pretrain=1520``), read from a ``benchmarks/pretrain_throughput.py`` JSON, or
derived from an achieved TFLOP/s (``--tflops``); without one the hours are left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pipelines.config import DetectStage, PipelineConfig, PretrainStage, StageBase


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

    def as_dict(self) -> dict:
        return asdict(self)


def _images(config: PipelineConfig, name: str, stage: StageBase) -> int:
    if stage.data.num_images:
        return stage.data.num_images
    from pipelines.pipeline import synthetic_roots
    from pipelines.stages.base import StageContext, resolve_source, split_size

    ctx = StageContext(config, "", "", "plan", Path(config.storage).resolve() / "plan", synthetic_roots(config))
    return split_size(resolve_source(ctx, name, stage.data), stage.data.train_split, name)


def _flops(config: PipelineConfig, name: str, stage: StageBase) -> tuple[float, float]:
    """(forward MACs, training FLOPs per image) of the stage's model. Heads are sized for
    1000 classes (80 for detection): their share of the FLOPs is negligible."""
    from mixmae_core.flops import flop_report

    model = config.stage_model(stage)
    if isinstance(stage, PretrainStage):
        report = flop_report(model, stage.img_size, **stage.model_overrides)
        return report.gflops * 1e9, report.train_gflops_per_image * 1e9
    from pipelines.stages.transfer import TASKS, TransferSettings, detector_kwargs, task_flops

    settings = TransferSettings(
        task=stage.task, model=model, img_size=stage.img_size, encoder_weights=None,
        model_overrides=stage.model_overrides, micro_batch=1, num_classes=getattr(stage, "num_classes", 80 if stage.task == "detect" else 1000),
        weight_decay=0.0, betas=(0.9, 0.999), layer_decay=None, drop_path=0.0, fast=False, stage=name,
        mode=getattr(stage, "mode", "finetune"), decoder_channels=getattr(stage, "decoder_channels", 512),
        detector=detector_kwargs(stage) if isinstance(stage, DetectStage) else {},
    )
    flops = task_flops(TASKS[stage.task](settings), stage.img_size, 1.0 if settings.mode == "linear_probe" else 3.0)
    return flops["flops/task_gmacs"] * 1e9, flops["flops/train_per_image"]


def bill(
    config: PipelineConfig,
    throughput: Optional[dict[str, float]] = None,
    tflops: Optional[float] = None,
    benchmark: Optional[Path] = None,
) -> list[StageBill]:
    throughput = dict(throughput or {})
    measured = None
    if benchmark is not None:
        result = json.loads(Path(benchmark).read_text())
        measured = result, max(row["img_per_s"] for row in result["rows"].values())
    out = []
    for name, stage in config.all_stages().items():
        n = _images(config, name, stage)
        macs, per_image = _flops(config, name, stage)
        units, per_step = (n // 2, stage.batch_size // 2) if isinstance(stage, PretrainStage) else (n, stage.batch_size)
        steps_per_epoch = max(units // per_step, 1)
        steps = math.ceil(stage.epochs * steps_per_epoch)
        if stage.max_steps:
            steps = min(steps, stage.max_steps)
        images = steps * stage.batch_size
        rate, source = throughput.get(name), "given"
        if rate is None and measured and isinstance(stage, PretrainStage):
            result, best = measured
            if result["model"] == stage.model and result["img_size"] == stage.img_size:
                rate, source = best, f"benchmark on {result['device']}"
        if rate is None and tflops:
            rate, source = tflops * 1e12 / per_image, f"{tflops:g} TFLOP/s achieved"
        device_hours = images / rate / 3600 if rate else None
        out.append(
            StageBill(
                stage=name, task=stage.task, model=config.stage_model(stage), img_size=stage.img_size,
                gflops=macs / 1e9, train_flops_per_image=per_image, images_per_epoch=n, steps=steps, images=images,
                train_flops=images * per_image, throughput=rate, device_hours=device_hours,
                wall_hours=device_hours / stage.scaling.num_workers if device_hours else None,
                throughput_source=source if rate else "none",
            )
        )
    return out
