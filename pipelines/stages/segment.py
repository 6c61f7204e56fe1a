"""The ADE20K stage's worker: UperNet on the encoder's four levels, mIoU and pixel accuracy
over the whole validation split, prediction pictures."""

from __future__ import annotations

from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F

from mixmae_core.tasks.metrics import segmentation_metrics
from mixmae_core.tasks.pictures import draw_segmentation
from mixmae_core.tasks.segmentation import build_upernet
from pipelines.data.transforms import IGNORE_INDEX
from pipelines.stages.distributed import world_size
from pipelines.stages.task import MicroBatch
from pipelines.stages.jobs import HEADLINE
from pipelines.stages.transfer import TransferTask


class SegmentTask(TransferTask):
    headline = HEADLINE["segment"]
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def build_model(self) -> nn.Module:
        job, spec = self.job, self.spec
        model = build_upernet(
            job.model, job.num_classes, img_size=spec.img_size, encoder_weights=job.encoder_weights,
            encoder_overrides=spec.model_overrides, drop_path_rate=spec.drop_path,
            decoder_channels=spec.decoder_channels,
        )
        # the decoder's BatchNorm sees one worker's micro-batch; synchronise it across workers
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if world_size() > 1 else model

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict]:
        images, labels = self.images(batch.inputs), batch.inputs["label"].to(self.device).long()
        return F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX), images.shape[0], {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = segmentation_metrics(self.job.num_classes).to(self.device)
        model.eval()
        self.samples = []
        for batch in self.evaluation_batches():
            images, labels = self.images(batch), batch["label"].to(self.device).long()
            prediction = model(images).argmax(1)
            metrics.update(prediction, labels)
            for image, pred, label in zip(batch["image"], prediction.cpu(), labels.cpu()):
                if len(self.samples) < self.spec.pictures:
                    self.samples.append((image, pred, label))
        model.train()
        return {f"val/{k}": float(v) for k, v in metrics.compute().items()}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if not final:
            return []
        paths = []
        for i, (image, pred, label) in enumerate(self.samples):
            path = out / f"segmentation_{i}.png"
            draw_segmentation(image, pred, label, num_classes=self.job.num_classes).save(path)
            paths.append(path)
        return paths


TASK = SegmentTask
