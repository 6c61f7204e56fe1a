"""The classification stages' worker (iNat2018/2019, Places205/365, ImageNet-1K): a fine-tuned
classifier with mixup/cutmix, random erasing and label smoothing, or a linear probe on the
frozen encoder (MAE's recipe); top-1/top-5 over the whole validation split."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixmae_core.checkpoint import load_encoder_weights, load_state_dict
from mixmae_core.tasks.classification import build_classifier, build_linear_probe, create_encoder
from mixmae_core.tasks.metrics import classification_metrics
from pipelines.stages.jobs import HEADLINE
from pipelines.stages.task import MicroBatch
from pipelines.stages.transfer import TransferTask


class ClassifyTask(TransferTask):
    headline = HEADLINE["classify"]
    @property
    def probe(self) -> bool:
        return self.spec.mode == "linear_probe"

    @property
    def layer_decay_applies(self) -> bool:  # a probe trains the head alone
        return not self.probe

    def build_model(self) -> nn.Module:
        job, spec = self.job, self.spec
        kwargs = dict(img_size=spec.img_size, encoder_weights=job.encoder_weights, **spec.model_overrides)
        if self.probe:
            return build_linear_probe(job.model, job.num_classes, **kwargs)
        return build_classifier(job.model, job.num_classes, drop_path_rate=spec.drop_path, **kwargs)

    def build(self, device: torch.device) -> nn.Module:
        model = super().build(device)
        spec = self.spec
        self.mixup = None
        if not self.probe and (spec.mixup > 0 or spec.cutmix > 0):
            self.mixup = Mixup(
                mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, label_smoothing=spec.label_smoothing,
                num_classes=self.job.num_classes,
            )
        reprob = 0.0 if self.probe else spec.reprob
        self.erase = RandomErasing(reprob, mode="pixel", device=str(device)) if reprob > 0 else None
        if self.mixup:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif spec.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(spec.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        return model

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict]:
        images = self.images(batch.inputs)
        targets = batch.inputs["label"].to(self.device)
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), images.shape[0], {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = classification_metrics(self.job.num_classes).to(self.device)
        model.eval()
        for batch in self.evaluation_batches():
            metrics.update(model(self.images(batch)), batch["label"].to(self.device))
        model.train()
        return {f"val/{k}": float(v) for k, v in metrics.compute().items()}


class ScoreTask(ClassifyTask):
    """A classification stage's evaluation of a finished checkpoint (``mixmae eval``): the
    classifier or linear probe as the checkpoint holds it, head included, nothing trained."""

    @property
    def probe(self) -> bool:
        return checkpoint_kind(load_state_dict(self.job.encoder_weights)) == "probe"

    def build_model(self) -> nn.Module:
        job, spec = self.job, self.spec
        state = load_state_dict(job.encoder_weights)
        if self.probe:
            model = build_linear_probe(job.model, job.num_classes, img_size=spec.img_size, **spec.model_overrides)
            model.load_state_dict(state)
            return model
        model = create_encoder(job.model, img_size=spec.img_size, num_classes=job.num_classes, drop_path_rate=0.0,
                               **spec.model_overrides)
        load_encoder_weights(model, state)
        return model


def checkpoint_kind(state: dict) -> str:
    """``probe`` (a linear probe's frozen encoder and BatchNorm + linear head), ``classifier``
    (an encoder with its classification head), or ``encoder`` (no head: nothing to score)."""
    if "head.1.weight" in state:
        return "probe"
    return "classifier" if any(key.endswith("head.weight") or key.endswith("head.fc.weight") for key in state) else "encoder"


def head_classes(state: dict) -> int:
    """Classes of a classifier or probe checkpoint's head."""
    key = "head.1.weight" if "head.1.weight" in state else next(k for k in state if k.endswith(("head.weight", "head.fc.weight")))
    return state[key].shape[0]


TASK = ClassifyTask
