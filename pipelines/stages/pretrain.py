"""The pretraining stage's worker: pair-sampled Ray Data batches, with each image's masks as
the method draws them, into MixMAE, SimMIM, MAE or BEiT through the one interface every method
has; and the k-NN monitor of its encoder along the way."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from mixmae_core.checkpoint import save_state_dict
from mixmae_core.encoders.base import apply_grad_checkpointing
from mixmae_core.fast import StepOptions, apply_step_options
from mixmae_core.methods import create_pretraining_model
from mixmae_core.optim import build_optimizer
from mixmae_core.tasks.knn import knn_predict, pooled_features
from mixmae_core.viz import save_reconstruction_png
from pipelines.data.collate import PairCollate, normalize_on_device
from pipelines.data.order import Shard
from pipelines.stages.checkpoints import ENCODER_FILE
from pipelines.stages.distributed import all_gather, unwrap
from pipelines.stages.task import MicroBatch, Task

#: decoded monitor images a worker keeps between evaluations (they are the same every time)
MONITOR_CACHE_BYTES = 512 * 2**20


class PretrainTask(Task):
    images_per_unit = 2  # pairs
    preview: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    monitor_images: dict[str, list[dict]] = {}

    def _options(self) -> StepOptions:
        return StepOptions.fast(self.device) if self.spec.fast else StepOptions()

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        spec = self.spec
        model = create_pretraining_model(
            spec.method, self.job.model, img_size=spec.img_size, mask_ratio=spec.mask_ratio, **spec.method_options(),
            **spec.model_tokenizer(self.job.tokenizer_weights), **spec.model_overrides,
        ).to(device)
        apply_grad_checkpointing(model, spec.grad_checkpointing)
        return apply_step_options(model, self._options())

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        fused = self._options().fused_adamw and self.device.type == "cuda"
        return build_optimizer(model, lr, self.spec.weight_decay, tuple(self.spec.betas), fused=fused)

    def batches(self, name: str, shard: Shard) -> Iterator[MicroBatch]:
        # masks stay on the CPU (the methods count them there without a device sync)
        for batch in self.dataset(name, shard).iter_torch_batches(
            batch_size=self.spec.micro_batch() // 2,
            collate_fn=PairCollate(),
            drop_last=True,
            device="cpu",
            prefetch_batches=4,
            pin_memory=self.device.type == "cuda",
        ):
            yield MicroBatch((batch["images"], batch["masks"]), batch["image_ids"], batch["position"])

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict]:
        pixels, masks = batch.inputs
        images = normalize_on_device(pixels.to(self.device, non_blocking=True))
        if self.preview is None:
            self.preview = (images[:8].detach().clone(), masks[:8].clone())
        out = model(images, masks)
        return out.loss, images.shape[0], out.metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The monitor's k-NN accuracy: every worker computes the features of its slice of the
        monitor's splits and every worker gets all of them, in image-id order, so the
        accuracy does not depend on the number of workers."""
        monitor = self.spec.monitor
        if monitor is None:
            return {}
        method = unwrap(model)
        if self.sharded:  # the encoder is called past the root's forward, which gathers its own parameters
            method.unshard()
        method.encoder.eval()
        (memory, memory_labels), (queries, labels) = (self._features(method.encoder, name) for name in ("monitor_train", "monitor_val"))
        method.encoder.train()
        if self.sharded:
            method.reshard()
        num_classes = self.job.data["monitor_train"].source.num_classes
        scores = knn_predict(memory, memory_labels, queries, num_classes, monitor.k, monitor.temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        return {"eval/knn_top1": (top[:, 0] == labels).float().mean().item(),
                "eval/knn_top5": (top == labels[:, None]).any(1).float().mean().item(), "eval/knn_images": len(labels)}

    def _features(self, encoder: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of every image of monitor split ``name`` (all workers'), by image id."""
        ids, labels, features = [], [], []
        batches = self._monitor_batches(name)
        for batch in batches:
            ids.append(batch["image_id"])
            labels.append(batch["label"])
            features.append(pooled_features(encoder, normalize_on_device(batch["image"].to(self.device))).cpu())
        if self.sharded:  # each block's forward gathers its parameters from every worker: all run as many
            size = self.spec.img_size
            for _ in range(max(all_gather(len(batches))) - len(batches)):
                pooled_features(encoder, torch.zeros(1, 3, size, size, device=self.device))
        mine = (torch.cat(ids), torch.cat(labels), torch.cat(features)) if ids else None
        parts = [part for part in all_gather(mine) if part is not None]
        ids, labels, features = (torch.cat(column) for column in zip(*parts))
        order = ids.argsort()
        return features[order].to(self.device), labels[order].to(self.device)

    def _monitor_batches(self, name: str) -> list[dict]:
        if name in self.monitor_images:
            return self.monitor_images[name]
        rows = self.dataset(name, self.evaluation_shard()).iter_torch_batches(
            batch_size=self.spec.micro_batch(), device="cpu", prefetch_batches=2
        )
        batches = [{k: batch[k] for k in ("image", "label", "image_id")} for batch in rows]
        if sum(batch["image"].nbytes for batch in batches) <= MONITOR_CACHE_BYTES:
            self.monitor_images = {**self.monitor_images, name: batches}
        return batches

    def picture_steps(self, total_steps: int) -> set[int]:
        n = self.spec.reconstructions
        if n <= 0:
            return set()
        return {1 + round(i * (total_steps - 1) / max(n - 1, 1)) for i in range(n)}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if self.preview is None:
            return []
        images, masks = self.preview
        was_training = model.training
        model.eval()
        with torch.no_grad():
            panels = model.panels(images, model(images, masks))
        model.train(was_training)
        return [Path(save_reconstruction_png(out / f"reconstruction_step{step:07d}.png", panels))]

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        meta = {"model": self.job.model, "method": self.spec.method, "img_size": self.spec.img_size, "source": "pretrain"}
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        save_state_dict(out / ENCODER_FILE, encoder, meta)


TASK = PretrainTask
