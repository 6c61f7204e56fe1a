"""Evaluation metrics of the transfer stages, all as fractions in [0, 1].

Classification and semantic segmentation are torchmetrics collections: ``update`` per
batch on every rank, ``compute`` once at the end. When ``torch.distributed`` is
initialised, ``compute`` gathers the states of all ranks (a collective: every rank must
call it), so each rank returns the metric of the whole evaluation set.

COCO detection / instance segmentation uses pycocotools on predictions gathered to one
process (COCOeval is not distributed).
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# torchmetrics (a second of imports) is loaded when a stage builds its metrics: `mixmae plan`
# builds the stages' models from these modules and answers while a user waits.
if TYPE_CHECKING:
    from torchmetrics import MetricCollection

COCO_KEYS = ("AP", "AP50", "AP75")
"""The first three of COCOeval's stats: AP at IoU .50:.95, at .50 and at .75."""


def classification_metrics(num_classes: int, topk: Sequence[int] = (1, 5)) -> "MetricCollection":
    """Top-k accuracies ``{"top1", "top5"}``; ``update(logits (B, K), labels (B,))``."""
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    return MetricCollection(
        {f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in topk}
    )


def segmentation_metrics(num_classes: int, ignore_index: int = 255) -> "MetricCollection":
    """``{"mIoU", "pixel_acc"}``; ``update(logits (B, C, H, W) or labels (B, H, W), target (B, H, W))``.

    Pixels labelled ``ignore_index`` count nowhere. mIoU averages the IoU of the classes
    present in the target or the prediction over everything seen (as mmseg does); classes
    absent from both are left out rather than counted as 0 or 1.
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    return MetricCollection(
        {
            "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index),
            "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        }
    )


def binary_masks(masks: torch.Tensor) -> torch.Tensor:
    """Instance masks ``(n, H, W)`` or torchvision's ``(n, 1, H, W)``, probabilities or bool -> bool ``(n, H, W)``."""
    masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
    return masks.reshape(len(masks), *masks.shape[-2:])


def coco_results(predictions: Sequence[Mapping[str, Any]], label_to_category: Mapping[int, int]):
    """Predictions -> COCO result lists ``{"bbox": [...], "segm": [...]}`` (masks as RLE).

    Small enough to gather across processes, so distributed evaluation converts per batch.

    Mask results carry no box, so pycocotools measures their area on the mask (the COCO
    convention for small/medium/large in segm AP), not on the box.
    """
    boxes, segms = [], []
    for pred in predictions:
        image_id = int(pred["image_id"])
        xyxy = torch.as_tensor(pred["boxes"], dtype=torch.float64).reshape(-1, 4)
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
        scores = torch.as_tensor(pred["scores"]).tolist()
        categories = [label_to_category[int(label)] for label in torch.as_tensor(pred["labels"]).tolist()]
        for box, score, category in zip(xywh, scores, categories):
            boxes.append(dict(image_id=image_id, category_id=category, bbox=box, score=score))
        if pred.get("masks") is None or not scores:
            continue
        masks = binary_masks(torch.as_tensor(pred["masks"]))
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
        for rle, score, category in zip(rles, scores, categories):
            segms.append(dict(image_id=image_id, category_id=category, segmentation=rle, score=score))
    return {"bbox": boxes, "segm": segms}


def coco_evaluate(
    gt: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    label_to_category: Mapping[int, int],
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> dict[str, float]:
    """COCO AP / AP50 / AP75 per IoU type, e.g. ``{"bbox_AP": ..., "segm_AP75": ...}``.

    ``gt``: a COCO instances dict (``images`` with height/width, ``annotations`` with bbox,
    area, iscrowd and, for segm, segmentation; ``categories``); it is not modified.
    ``predictions``: per image ``{"image_id", "boxes" (n, 4) xyxy in pixels, "scores",
    "labels" (contiguous model labels), "masks" (n, H, W) or (n, 1, H, W), probabilities
    (thresholded at 0.5) or bool}`` (torchvision's output plus the image id).
    ``label_to_category`` maps model labels to COCO category ids.
    """
    return coco_evaluate_results(gt, coco_results(predictions, label_to_category), iou_types)


def coco_evaluate_results(
    gt: Mapping[str, Any], results: Mapping[str, list], iou_types: Sequence[str] = ("bbox", "segm")
) -> dict[str, float]:
    """``coco_evaluate`` on results already converted by :func:`coco_results` (and merged
    across processes). An IoU type without any result scores 0; pycocotools' printing is
    swallowed."""
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dict(gt))
        coco_gt.createIndex()
        for iou_type in iou_types:
            if not results[iou_type]:
                out.update({f"{iou_type}_{key}": 0.0 for key in COCO_KEYS})
                continue
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results[iou_type]), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            out.update({f"{iou_type}_{key}": float(value) for key, value in zip(COCO_KEYS, evaluator.stats)})
    return out
