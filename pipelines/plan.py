"""The bill before launching: per stage FLOPs, optimizer steps and estimated device-hours.

Steps and FLOPs come from the functions the stages use (``pipelines.stages.prepare``),
FLOPs measured with torch's counter on the real models. Image counts come from the data
when it is on this machine, else from the stage's ``data.num_images``. Device-hours need a throughput per device: given per stage
(``--throughput pretrain=1520``), read from a ``benchmarks/pretrain_throughput.py`` JSON, or
derived from an achieved TFLOP/s (``--tflops``); without one the hours are left out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pipelines.config import DetectStage, PipelineConfig, PretrainStage, SegmentStage, StageBase
from pipelines.stages.prepare import schedule, stage_flops


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
    from pipelines.stages.prepare import StageContext, resolve_source, split_size

    ctx = StageContext(config, "", "", "plan", Path(config.storage).resolve() / "plan", synthetic_roots(config))
    return split_size(resolve_source(ctx, name, stage.data), stage.data.train_split, name)


def _head_classes(stage: StageBase) -> int:
    """Classes of the head the bill prices: the task's own where the config says, else
    ImageNet's 1000 (COCO's 80 for detection); a head's share of the FLOPs is negligible."""
    if isinstance(stage, SegmentStage):
        return stage.num_classes
    return 80 if isinstance(stage, DetectStage) else 1000


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
        flops = stage_flops(config, name, stage, _head_classes(stage))
        macs = 1e9 * flops.get("flops/encoder_gmacs", flops.get("flops/task_gmacs"))
        per_image = flops["flops/train_per_image"]
        steps = schedule(name, stage, n).total_steps
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
