"""The COCO stage's worker: Mask R-CNN + FPN on the encoder's four levels, box and mask AP by
pycocotools over the whole validation split, prediction pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import ray
import torch
import torch.nn as nn

from mixmae_core.tasks.detection import build_mask_rcnn
from mixmae_core.tasks.metrics import coco_evaluate_results, coco_results
from mixmae_core.tasks.pictures import draw_detections
from pipelines.stage_config import DetectStage
from pipelines.data.collate import DetectionCollate
from pipelines.data.order import Shard
from pipelines.stages.distributed import all_gather, world_rank
from pipelines.stages.task import MicroBatch
from pipelines.stages.jobs import HEADLINE
from pipelines.stages.transfer import TransferTask


def detector_kwargs(spec: DetectStage) -> dict[str, Any]:
    """``build_mask_rcnn`` keyword arguments of a detection stage."""
    return dict(
        fpn_channels=spec.fpn_channels, head_channels=spec.head_channels, box_head_dim=spec.box_head_dim,
        box_batch_size_per_image=spec.rois_per_image, box_detections_per_img=spec.detections_per_image,
        rpn_pre_nms_top_n_train=2 * spec.proposals, rpn_post_nms_top_n_train=2 * spec.proposals,
        rpn_pre_nms_top_n_test=spec.proposals, rpn_post_nms_top_n_test=spec.proposals,
    )


class DetectTask(TransferTask):
    headline = HEADLINE["detect"]
    samples: list[tuple[torch.Tensor, dict]] = []

    def build_model(self) -> nn.Module:
        job, spec = self.job, self.spec
        return build_mask_rcnn(
            job.model, job.num_classes + 1, img_size=spec.img_size, encoder_weights=job.encoder_weights,
            encoder_overrides=spec.model_overrides, drop_path_rate=spec.drop_path, **detector_kwargs(spec),
        )

    def rows(self, name: str, shard: Shard, **kwargs) -> Iterator[dict]:
        return super().rows(name, shard, collate_fn=DetectionCollate(), **kwargs)

    def on_device(self, batch: dict) -> tuple[list[torch.Tensor], list[dict]]:
        return (
            [image.to(self.device, non_blocking=True).float().div_(255) for image in batch["images"]],
            [{k: v.to(self.device) for k, v in t.items()} for t in batch["targets"]],
        )

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict]:
        images, targets = self.on_device(batch.inputs)
        return sum(model(images, targets).values()), len(images), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        results: dict[str, list] = {"bbox": [], "segm": []}
        self.samples = []
        wanted = self.spec.pictures
        labels = {k: k for k in range(1, self.job.num_classes + 1)}
        for images, targets in map(self.on_device, self.evaluation_batches()):
            outputs = model(images)
            predictions = [
                {**{k: v.cpu() for k, v in out.items()}, "image_id": int(t["image_id"])} for out, t in zip(outputs, targets)
            ]
            for kind, items in coco_results(predictions, labels).items():
                results[kind] += items
            if len(self.samples) < wanted:
                self.samples += [(img.cpu(), p) for img, p in zip(images, predictions)][: wanted - len(self.samples)]
        model.train()
        merged = {kind: [r for part in all_gather(results) for r in part[kind]] for kind in results}
        scores = coco_evaluate_results(ray.get(self.job.coco_gt), merged) if world_rank() == 0 else None
        return {f"val/{k}": v for k, v in all_gather(scores)[0].items()}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if not final:
            return []
        paths = []
        for i, (image, pred) in enumerate(self.samples):
            path = out / f"detections_{i}.png"
            draw_detections(
                (image * 255).to(torch.uint8), pred["boxes"], pred["labels"], masks=pred["masks"], scores=pred["scores"],
                class_names=["background", *self.job.class_names],
            ).save(path)
            paths.append(path)
        return paths


TASK = DetectTask
