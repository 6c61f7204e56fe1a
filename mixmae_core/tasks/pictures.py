"""Pictures of transfer-task predictions: detections with masks, semantic segmentation."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from mixmae_core.tasks.metrics import binary_masks


def palette(num_classes: int) -> torch.Tensor:
    """``(num_classes, 3)`` uint8 colours, the same for a class in every picture of a run."""
    return torch.randint(0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@torch.no_grad()
def draw_detections(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    score_threshold: float = 0.5,
    class_names: Optional[Sequence[str]] = None,
) -> Image.Image:
    """Boxes (xyxy pixels), captions and masks (probabilities > 0.5 or bool, ``(n, [1,] H, W)``)
    with score >= ``score_threshold`` drawn on a uint8 ``(3, H, W)`` image; colour by class."""
    image, boxes, labels = image.cpu(), boxes.cpu().reshape(-1, 4), labels.cpu().long()
    keep = torch.ones(len(labels), dtype=torch.bool) if scores is None else scores.cpu() >= score_threshold
    boxes, labels = boxes[keep], labels[keep]
    colours = [tuple(c) for c in palette(int(labels.max()) + 1)[labels].tolist()] if len(labels) else []
    if masks is not None and len(labels):
        image = draw_segmentation_masks(image, binary_masks(masks.cpu())[keep], 0.5, colours)
    names = [class_names[i] if class_names else str(i) for i in labels.tolist()]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores.cpu()[keep].tolist())]
    if not len(labels):  # nothing above the threshold: the image as it is
        return to_pil_image(image)
    return to_pil_image(draw_bounding_boxes(image, boxes, names, colours, width=2))


@torch.no_grad()
def draw_segmentation(
    image: torch.Tensor,
    pred: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    num_classes: int,
    ignore_index: int = 255,
) -> Image.Image:
    """Side by side: uint8 ``(3, H, W)`` image | predicted labels | target labels (if given).

    Labels are ``(H, W)`` class ids coloured with ``palette``; ``ignore_index`` is black.
    """
    colours = torch.cat([palette(num_classes), torch.zeros(1, 3, dtype=torch.uint8)])

    def colour(labels: torch.Tensor) -> torch.Tensor:
        labels = labels.cpu().long()
        return colours[torch.where(labels == ignore_index, num_classes, labels)].permute(2, 0, 1)

    panels = [image.cpu(), colour(pred)] + ([] if target is None else [colour(target)])
    return to_pil_image(torch.cat(panels, dim=2))
