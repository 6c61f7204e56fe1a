"""The transfer stages: classification (iNat2018/2019, Places205/365, ImageNet-1K; fine-tune
or linear probe), COCO detection + instance segmentation (Mask R-CNN + FPN), ADE20K
semantic segmentation (UperNet). Same shape as pretraining: a planner on the driver, a
:class:`~pipelines.stages.loop.Task` in the workers, one MLflow run each.

Every stage starts from the pretraining stage's encoder (``init: pretrained``), from
random weights (``init: random``), or from a checkpoint path (ours or an official one
converted by ``mixmae convert``), so the gain of pretraining is one MLflow comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixmae_core.checkpoint import save_state_dict
from mixmae_core.flops import forward_macs
from mixmae_core.metrics import classification_metrics, coco_evaluate_results, coco_results, segmentation_metrics
from mixmae_core.models.classification import build_classifier, build_linear_probe
from mixmae_core.models.detection import build_mask_rcnn
from mixmae_core.models.segmentation import build_upernet
from mixmae_core.optim import build_optimizer
from mixmae_core.viz import draw_detections, draw_segmentation
from pipelines.config import ClassifyStage, DetectStage, SegmentStage, TransferBase
from pipelines.data.collate import DetectionCollate, normalize_on_device
from pipelines.data.datasets import (
    classification_dataset,
    coco_ground_truth,
    detection_dataset,
    segmentation_dataset,
)
from pipelines.stages.base import (
    StageContext,
    StageError,
    StagePlan,
    resolve_source,
    resume_epoch,
    split_size,
    steps_per_epoch,
)
from pipelines.stages.loop import ENCODER_FILE, LoopSpec, Task, stage_dataset, train


@dataclass
class TransferSettings:
    task: str
    model: str
    img_size: int
    encoder_weights: Optional[str]
    model_overrides: dict[str, Any]
    micro_batch: int
    num_classes: int
    weight_decay: float
    betas: tuple[float, float]
    layer_decay: Optional[float]
    drop_path: float
    fast: bool
    stage: str
    optimizer: str = "adamw"
    mode: str = "finetune"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    reprob: float = 0.0
    detector: dict[str, Any] = field(default_factory=dict)  # build_mask_rcnn keyword arguments
    decoder_channels: int = 512
    pictures: int = 0
    class_names: list[str] = field(default_factory=list)
    coco_gt: Any = None


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class TransferTask(Task):
    """Shared by the three kinds: device placement, optimizer with layer decay, shards."""

    def __init__(self, settings: TransferSettings):
        self.s = settings
        self.device = torch.device("cpu")

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        model = self.build_model().to(device)
        if self.s.fast and device.type == "cuda":
            model.compile(dynamic=False)
        return model

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(
            model, lr, self.s.weight_decay, tuple(self.s.betas), self.s.layer_decay,
            fused=self.s.fast and self.device.type == "cuda", opt=self.s.optimizer,
        )

    def _batches(self, name: str, **kwargs) -> Iterator[dict]:
        shard = ray.train.get_dataset_shard(stage_dataset(self.s.stage, name))
        yield from shard.iter_torch_batches(batch_size=self.s.micro_batch, device="cpu", prefetch_batches=2, **kwargs)

    def _images(self, batch: dict) -> torch.Tensor:
        return normalize_on_device(batch["image"].to(self.device, non_blocking=True))

    def export(self, model: nn.Module, out: Path) -> None:
        meta = {"model": self.s.model, "img_size": self.s.img_size, "source": f"mixmae-{self.s.stage}"}
        save_state_dict(out / ENCODER_FILE, model.state_dict(), meta)

    def picture_steps(self, total_steps: int) -> set[int]:
        return set()


class ClassifyTask(TransferTask):
    def build_model(self) -> nn.Module:
        kwargs = dict(img_size=self.s.img_size, encoder_weights=self.s.encoder_weights, **self.s.model_overrides)
        if self.s.mode == "linear_probe":
            return build_linear_probe(self.s.model, self.s.num_classes, **kwargs)
        return build_classifier(self.s.model, self.s.num_classes, drop_path_rate=self.s.drop_path, **kwargs)

    def build(self, device: torch.device) -> nn.Module:
        model = super().build(device)
        s = self.s
        self.mixup = None
        if s.mode == "finetune" and (s.mixup > 0 or s.cutmix > 0):
            self.mixup = Mixup(
                mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.label_smoothing, num_classes=s.num_classes
            )
        self.erase = RandomErasing(s.reprob, mode="pixel", device=str(device)) if s.reprob > 0 else None
        if self.mixup:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif s.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(s.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        return model

    def micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._batches("train", drop_last=True):
            images = self._images(batch)
            targets = batch["label"].to(self.device)
            if self.erase is not None:
                images = self.erase(images)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            yield images, targets

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, targets = batch
        return self.criterion(model(images), targets), images.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = classification_metrics(self.s.num_classes).to(self.device)
        model.eval()
        for batch in self._batches("val"):
            metrics.update(model(self._images(batch)), batch["label"].to(self.device))
        model.train()
        return {f"val/{k}": float(v) for k, v in metrics.compute().items()}


class DetectTask(TransferTask):
    def build_model(self) -> nn.Module:
        return build_mask_rcnn(
            self.s.model, self.s.num_classes + 1, img_size=self.s.img_size, encoder_weights=self.s.encoder_weights,
            encoder_overrides=self.s.model_overrides, drop_path_rate=self.s.drop_path, **self.s.detector,
        )

    def _detection_batches(self, name: str) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        for images, targets in self._batches(name, collate_fn=DetectionCollate(), drop_last=name == "train"):
            yield (
                [image.to(self.device, non_blocking=True).float().div_(255) for image in images],
                [{k: v.to(self.device) for k, v in t.items()} for t in targets],
            )

    def micro_batches(self, epoch: int):
        return self._detection_batches("train")

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, targets = batch
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        results: dict[str, list] = {"bbox": [], "segm": []}
        self.samples: list[tuple[torch.Tensor, dict]] = []
        for images, targets in self._detection_batches("val"):
            outputs = model(images)
            predictions = [
                {**{k: v.cpu() for k, v in out.items()}, "image_id": int(t["image_id"])} for out, t in zip(outputs, targets)
            ]
            for kind, items in coco_results(predictions, {k: k for k in range(1, self.s.num_classes + 1)}).items():
                results[kind] += items
            if len(self.samples) < self.s.pictures:
                self.samples += [(img.cpu(), p) for img, p in zip(images, predictions)][: self.s.pictures - len(self.samples)]
        model.train()
        merged = {kind: [r for part in _gather(results) for r in part[kind]] for kind in results}
        scores = coco_evaluate_results(ray.get(self.s.coco_gt), merged) if dist_rank() == 0 else None
        return {f"val/{k}": v for k, v in _gather(scores)[0].items()}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if not final:
            return []
        paths = []
        for i, (image, pred) in enumerate(getattr(self, "samples", [])):
            path = out / f"detections_{i}.png"
            draw_detections(
                (image * 255).to(torch.uint8), pred["boxes"], pred["labels"], masks=pred["masks"], scores=pred["scores"],
                class_names=["background", *self.s.class_names],
            ).save(path)
            paths.append(path)
        return paths


class SegmentTask(TransferTask):
    def build_model(self) -> nn.Module:
        model = build_upernet(
            self.s.model, self.s.num_classes, img_size=self.s.img_size, encoder_weights=self.s.encoder_weights,
            encoder_overrides=self.s.model_overrides, drop_path_rate=self.s.drop_path,
            decoder_channels=self.s.decoder_channels,
        )
        # the decoder's BatchNorm sees one worker's micro-batch; synchronise it across workers
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if dist_world() > 1 else model

    def micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._batches("train", drop_last=True):
            yield self._images(batch), batch["label"].to(self.device).long()

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, labels = batch
        return F.cross_entropy(model(images), labels, ignore_index=255), images.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = segmentation_metrics(self.s.num_classes).to(self.device)
        model.eval()
        self.samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for batch in self._batches("val"):
            images, labels = self._images(batch), batch["label"].to(self.device).long()
            prediction = model(images).argmax(1)
            metrics.update(prediction, labels)
            for image, pred, label in zip(batch["image"], prediction.cpu(), labels.cpu()):
                if len(self.samples) < self.s.pictures:
                    self.samples.append((image, pred, label))
        model.train()
        return {f"val/{k}": float(v) for k, v in metrics.compute().items()}

    def pictures(self, model: nn.Module, step: int, final: bool, out: Path) -> list[Path]:
        if not final:
            return []
        paths = []
        for i, (image, pred, label) in enumerate(getattr(self, "samples", [])):
            path = out / f"segmentation_{i}.png"
            draw_segmentation(image, pred, label, num_classes=self.s.num_classes).save(path)
            paths.append(path)
        return paths


def dist_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


TASKS: dict[str, type[TransferTask]] = {"classify": ClassifyTask, "detect": DetectTask, "segment": SegmentTask}


def run_worker(config: dict) -> None:
    settings = TransferSettings(**config["task"])
    train(TASKS[settings.task](settings), LoopSpec(**config["loop"]))


def encoder_source(ctx: StageContext, name: str, spec: TransferBase) -> Optional[str]:
    """Which encoder weights a transfer stage starts from (None: random init)."""
    if spec.init == "random":
        return None
    if spec.init == "pretrained":
        if not ctx.encoder_checkpoint:
            raise StageError(
                f"stage {name} starts from the pretrained encoder, but this pipeline has no finished "
                "pretraining stage; run it first, or set init: random or init: <checkpoint path>"
            )
        return ctx.encoder_checkpoint
    path = Path(spec.init).expanduser().resolve()
    if not path.exists():
        raise StageError(f"stage {name}: init checkpoint {path} does not exist")
    return str(path)


def detector_kwargs(spec: DetectStage) -> dict[str, Any]:
    """``build_mask_rcnn`` keyword arguments of a detection stage."""
    return dict(
        fpn_channels=spec.fpn_channels, head_channels=spec.head_channels, box_head_dim=spec.box_head_dim,
        box_batch_size_per_image=spec.rois_per_image, box_detections_per_img=spec.detections_per_image,
        rpn_pre_nms_top_n_train=2 * spec.proposals, rpn_post_nms_top_n_train=2 * spec.proposals,
        rpn_pre_nms_top_n_test=spec.proposals, rpn_post_nms_top_n_test=spec.proposals,
    )


def task_flops(task: TransferTask, img_size: int, train_factor: float) -> dict[str, float]:
    """GFLOPs (MACs, paper convention) of the task model and training FLOPs per image
    (2 FLOPs per MAC, and a backward pass of about twice the forward where it trains)."""
    model = task.build_model().eval()
    macs = forward_macs(model, torch.rand(1, 3, img_size, img_size))
    return {"flops/task_gmacs": macs / 1e9, "flops/train_per_image": 2 * macs * train_factor}


def plan(ctx: StageContext, name: str, run_id: str) -> StagePlan:
    spec = ctx.config.stages[name]
    source = resolve_source(ctx, name, spec.data)
    images = split_size(source, spec.data.train_split, name)
    split_size(source, spec.data.val_split, name)
    weights = encoder_source(ctx, name, spec)
    model = ctx.config.stage_model(spec)
    common = dict(img_size=spec.img_size, seed=spec.seed, counter=ctx.skips(run_id))
    epoch = resume_epoch(ctx, name)
    settings = TransferSettings(
        task=spec.task, model=model, img_size=spec.img_size, encoder_weights=weights,
        model_overrides=spec.model_overrides, micro_batch=spec.micro_batch(), num_classes=source.num_classes,
        weight_decay=spec.weight_decay, betas=spec.betas, layer_decay=spec.layer_decay, drop_path=spec.drop_path,
        fast=spec.fast, stage=name, optimizer=spec.optimizer, class_names=list(source.classes),
    )
    train_factor = 3.0
    if isinstance(spec, ClassifyStage):
        probe = spec.mode == "linear_probe"
        settings.mode, settings.mixup, settings.cutmix = spec.mode, spec.mixup, spec.cutmix
        settings.label_smoothing, settings.reprob = spec.label_smoothing, (0.0 if probe else spec.reprob)
        if probe:
            settings.layer_decay = None
            train_factor = 1.0
        augment = dict(auto_augment=None if probe else spec.auto_augment, crop_pct=spec.crop_pct, scale=spec.crop_scale)
        train_ds = classification_dataset(source, split=spec.data.train_split, train=True, epoch=epoch, **augment, **common)
        val_ds = classification_dataset(source, split=spec.data.val_split, train=False, **augment, **common)
    elif isinstance(spec, DetectStage):
        settings.pictures = spec.pictures
        settings.detector = detector_kwargs(spec)
        settings.coco_gt = ray.put(coco_ground_truth(source, split=spec.data.val_split, img_size=spec.img_size))
        train_ds = detection_dataset(source, split=spec.data.train_split, train=True, epoch=epoch, **common)
        val_ds = detection_dataset(source, split=spec.data.val_split, train=False, **common)
    elif isinstance(spec, SegmentStage):
        settings.num_classes = spec.num_classes
        settings.decoder_channels, settings.pictures = spec.decoder_channels, spec.pictures
        train_ds = segmentation_dataset(source, split=spec.data.train_split, train=True, epoch=epoch, **common)
        val_ds = segmentation_dataset(source, split=spec.data.val_split, train=False, **common)
    else:  # pragma: no cover - the config schema admits only these
        raise StageError(f"stage {name}: unknown task {spec.task}")
    flops = task_flops(TASKS[spec.task](settings), spec.img_size, train_factor)
    steps = steps_per_epoch(images, spec.batch_size, name)
    return StagePlan(
        worker="transfer",
        worker_config={"task": settings.__dict__},
        datasets={"train": train_ds, "val": val_ds},
        split=["train"],
        evaluation=["val"],
        steps_per_epoch=steps,
        flops={**flops, "data/train_images": images},
        tags={"init": weights or "random", "task": spec.task, "data": str(source.files[0])},
        spec_overrides={"eval_every": max(1, round(spec.eval_every_epochs * steps))},
    )


PLANNERS = {"classify": plan, "detect": plan, "segment": plan}
