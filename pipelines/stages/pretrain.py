"""The pretraining stage's worker: pair-sampled Ray Data batches into MixMAE, SimMIM or MAE."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import ray.train
import torch
import torch.nn as nn

from mixmae_core.checkpoint import save_state_dict
from mixmae_core.fast import StepOptions, apply_step_options
from mixmae_core.methods import create_pretraining_model, pretraining_step
from mixmae_core.optim import build_optimizer
from mixmae_core.viz import save_reconstruction_png
from pipelines.data.collate import PairCollate, normalize_on_device
from pipelines.memory import apply_grad_checkpointing
from pipelines.stages.jobs import stage_dataset
from pipelines.stages.checkpoints import ENCODER_FILE
from pipelines.stages.loop import Task


class PretrainTask(Task):
    preview: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _options(self) -> StepOptions:
        return StepOptions.fast(self.device) if self.spec.fast else StepOptions()

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        spec = self.spec
        options = dict(mixmae=dict(mask_mode=spec.mask_mode, norm_pix_loss=spec.norm_pix_loss),
                       mae=dict(norm_pix_loss=spec.norm_pix_loss)).get(spec.method, {})
        model = create_pretraining_model(
            spec.method, self.job.model, img_size=spec.img_size, mask_ratio=spec.mask_ratio, **options,
            **spec.model_overrides,
        ).to(device)
        apply_grad_checkpointing(model, spec.grad_checkpointing)
        return apply_step_options(model, self._options())

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        fused = self._options().fused_adamw and self.device.type == "cuda"
        return build_optimizer(model, lr, self.spec.weight_decay, tuple(self.spec.betas), fused=fused)

    def micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = ray.train.get_dataset_shard(stage_dataset(self.job.name, "train"))
        # masks stay on the CPU (the encoder counts them there without a device sync)
        for batch in shard.iter_torch_batches(
            batch_size=self.spec.micro_batch() // 2,
            collate_fn=PairCollate(),
            drop_last=True,
            device="cpu",
            prefetch_batches=4,
            pin_memory=self.device.type == "cuda",
        ):
            images = normalize_on_device(batch["images"].to(self.device, non_blocking=True))
            mask = self.masks(batch["mask"])
            if self.preview is None:
                self.preview = (images[:8].detach().clone(), mask[:4].clone())
            yield images, mask

    def masks(self, drawn: torch.Tensor) -> torch.Tensor:
        """The micro-batch's masks: one per pair as the data pipeline drew them, or with
        ``mask_mode: batch`` the first pair's for every pair (the official code draws one
        mask per step and device)."""
        return drawn[:1].expand_as(drawn).contiguous() if self.spec.mask_mode == "batch" else drawn

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, mask = batch
        return pretraining_step(model, images, mask).loss, images.shape[0]

    def picture_steps(self, total_steps: int) -> set[int]:
        n = self.spec.reconstructions
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
            panels = model.panels(images, pretraining_step(model, images, mask))
        model.train(was_training)
        return [Path(save_reconstruction_png(out / f"reconstruction_step{step:07d}.png", panels))]

    def export(self, model: nn.Module, out: Path) -> None:
        meta = {"model": self.job.model, "method": self.spec.method, "img_size": self.spec.img_size, "source": "pretrain"}
        save_state_dict(out / ENCODER_FILE, model.encoder.state_dict(), meta)


TASK = PretrainTask
