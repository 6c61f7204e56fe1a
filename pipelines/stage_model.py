"""A stage's model as an MLflow pyfunc (models from code: MLflow stores this file as the
model's code and runs it on ``mlflow.pyfunc.load_model``).

The model is rebuilt from the stage's settings (``model_config``) and its safetensors
weights (the ``weights`` artifact), so loading unpickles nothing. ``predict`` takes float
images ``(B, 3, S, S)`` normalised with the ImageNet mean and std and returns:

* pretraining: the encoder's pooled features ``(B, C)``;
* classification: logits ``(B, classes)``;
* segmentation: class ids ``(B, S, S)``;
* detection: one row per detection (``image``, ``x0``, ``y0``, ``x1``, ``y1``, ``label``, ``score``).

Loading needs this package installed (``pip install -e .`` of this repository).
"""

from __future__ import annotations

import importlib
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model

from mixmae_core.checkpoint import load_state_dict


def job_config(job) -> dict[str, Any]:
    """What ``load`` needs to rebuild a stage's model: JSON only."""
    return {"name": job.name, "task": job.task, "spec": job.spec.model_dump(mode="json"), "model": job.model,
            "num_classes": job.num_classes, "class_names": list(job.class_names)}


def load(config: dict[str, Any], weights: str) -> torch.nn.Module:
    """The stage's model with its ``weights``, in eval mode. A pretrained encoder loads as a
    classifier of its name would (a BEiT's shared position bias given to every block)."""
    from mixmae_core.checkpoint import load_encoder_weights

    model = build(config)
    if config["task"] == "pretrain":
        load_encoder_weights(model, weights)
    else:
        model.load_state_dict(load_state_dict(weights))
    return model.eval()


def build(config: dict[str, Any]) -> torch.nn.Module:
    """The stage's model, randomly initialised, as the stage built it."""
    import timm

    from pipelines.stage_config import ClassifyStage, DetectStage, PretrainStage, SegmentStage
    from pipelines.stages.jobs import StageJob

    spec_type = {"pretrain": PretrainStage, "classify": ClassifyStage, "detect": DetectStage, "segment": SegmentStage}
    spec = spec_type[config["task"]].model_validate(config["spec"])
    if config["task"] == "pretrain":
        return timm.create_model(config["model"], num_classes=0, img_size=spec.img_size, **spec.model_overrides)
    job = StageJob(config["name"], spec, config["model"], num_classes=config["num_classes"],
                   class_names=tuple(config["class_names"]))
    return importlib.import_module(f"pipelines.stages.{config['task']}").TASK(job).build_model()


@torch.no_grad()
def outputs(task: str, model: torch.nn.Module, images: torch.Tensor):
    if task == "pretrain":
        return model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    if task == "classify":
        return model(images).numpy()
    if task == "segment":
        return model(images).argmax(1).numpy()
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # Mask R-CNN normalises itself

    pixels = images * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    rows = [
        (i, *box, int(label), float(score))
        for i, out in enumerate(model(list(pixels.clamp(0, 1))))
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())
    ]
    columns = {"image": "int64", "x0": "float64", "y0": "float64", "x1": "float64", "y1": "float64",
               "label": "int64", "score": "float64"}
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


class StageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.task = context.model_config["task"]
        self.model = load(context.model_config, context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        return outputs(self.task, self.model, torch.as_tensor(np.asarray(model_input, dtype=np.float32)))


set_model(StageModel())
