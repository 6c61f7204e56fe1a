"""The MixMAE pretraining stage: pair-sampled Ray Data batches into ``mixmae_core.MixMAE``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import ray.train
import torch
import torch.nn as nn

import mixmae_core
from mixmae_core.checkpoint import save_state_dict
from mixmae_core.fast import StepOptions, apply_step_options
from mixmae_core.flops import flop_report
from mixmae_core.optim import build_optimizer
from mixmae_core.viz import save_reconstruction_png
from pipelines.data.collate import PairCollate, normalize_on_device
from pipelines.data.datasets import pretrain_dataset
from pipelines.stages.base import (
    StageContext,
    StagePlan,
    resolve_source,
    resume_epoch,
    split_size,
    steps_per_epoch,
)
from pipelines.stages.loop import ENCODER_FILE, LoopSpec, Task, stage_dataset, train


@dataclass
class PretrainSettings:
    model: str
    img_size: int
    mask_ratio: float
    mask_mode: str
    norm_pix_loss: bool
    model_overrides: dict[str, Any]
    micro_batch: int
    weight_decay: float
    betas: tuple[float, float]
    fast: bool
    reconstructions: int
    stage: str = "pretrain"
    extra: dict[str, Any] = field(default_factory=dict)


class PretrainTask(Task):
    def __init__(self, settings: PretrainSettings):
        self.s = settings
        self.device = torch.device("cpu")
        self.preview: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _options(self) -> StepOptions:
        return StepOptions.fast(self.device) if self.s.fast else StepOptions()

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        model = mixmae_core.create_model(
            self.s.model,
            img_size=self.s.img_size,
            mask_ratio=self.s.mask_ratio,
            mask_mode=self.s.mask_mode,
            norm_pix_loss=self.s.norm_pix_loss,
            **self.s.model_overrides,
        ).to(device)
        return apply_step_options(model, self._options())

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        fused = self._options().fused_adamw and self.device.type == "cuda"
        return build_optimizer(model, lr, self.s.weight_decay, tuple(self.s.betas), fused=fused)

    def micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = ray.train.get_dataset_shard(stage_dataset(self.s.stage, "train"))
        # masks stay on the CPU (the encoder counts them there without a device sync)
        for batch in shard.iter_torch_batches(
            batch_size=self.s.micro_batch // 2,
            collate_fn=PairCollate(),
            drop_last=True,
            device="cpu",
            prefetch_batches=4,
            pin_memory=self.device.type == "cuda",
        ):
            images = normalize_on_device(batch["images"].to(self.device, non_blocking=True))
            if self.preview is None:
                self.preview = (images[:8].detach().clone(), batch["mask"][:4].clone())
            yield images, batch["mask"]

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, mask = batch
        return model(images, mask).loss, images.shape[0]

    def picture_steps(self, total_steps: int) -> set[int]:
        n = self.s.reconstructions
        if n <= 0:
            return set()
        return {1 + round(i * (total_steps - 1) / max(n - 1, 1)) for i in range(n)}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if self.preview is None:
            return []
        images, mask = self.preview
        was_training = model.training
        model.eval()
        with torch.no_grad():
            output = model(images, mask)
        model.train(was_training)
        path = out / f"reconstruction_step{step:07d}.png"
        save_reconstruction_png(path, images, output.pred, output.mask, model.stride, self.s.norm_pix_loss)
        return [path]

    def export(self, model: nn.Module, out: Path) -> None:
        meta = {"model": self.s.model, "img_size": self.s.img_size, "source": "mixmae-pretrain"}
        save_state_dict(out / ENCODER_FILE, model.encoder.state_dict(), meta)


def run_worker(config: dict) -> None:
    train(PretrainTask(PretrainSettings(**config["task"])), LoopSpec(**config["loop"]))


def plan(ctx: StageContext, name: str, run_id: str) -> StagePlan:
    spec = ctx.config.pretrain
    source = resolve_source(ctx, name, spec.data)
    images = split_size(source, spec.data.train_split, name)
    steps = steps_per_epoch(images // 2, spec.batch_size // 2, name)
    dataset = pretrain_dataset(
        source,
        split=spec.data.train_split,
        img_size=spec.img_size,
        mask_ratio=spec.mask_ratio,
        seed=spec.seed,
        epoch=resume_epoch(ctx, name),
        counter=ctx.skips(run_id),
    )
    report = flop_report(spec.model, spec.img_size, **spec.model_overrides)
    settings = PretrainSettings(
        stage=name,
        model=spec.model,
        img_size=spec.img_size,
        mask_ratio=spec.mask_ratio,
        mask_mode=spec.mask_mode,
        norm_pix_loss=spec.norm_pix_loss,
        model_overrides=spec.model_overrides,
        micro_batch=spec.micro_batch(),
        weight_decay=spec.weight_decay,
        betas=spec.betas,
        fast=spec.fast,
        reconstructions=spec.reconstructions,
    )
    return StagePlan(
        worker="pretrain",
        worker_config={"task": settings.__dict__},
        datasets={"train": dataset},
        split=["train"],
        steps_per_epoch=steps,
        flops={
            "flops/encoder_gmacs": report.gflops,
            "flops/params_m": report.params_m,
            "flops/pretrain_params_m": report.pretrain_params_m,
            "flops/train_per_image": report.train_gflops_per_image * 1e9,
            "data/train_images": images,
        },
        tags={"mask_ratio": str(spec.mask_ratio), "mask_mode": spec.mask_mode, "data": str(source.files[0])},
    )
