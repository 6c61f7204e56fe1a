"""Pictures: MixMAE reconstructions (original, mixed input, reconstruction for both images of a
pair) and transfer-task predictions (detections with masks, semantic segmentation)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid, save_image

from mixmae_core.losses import patch_stats, patchify, unpatchify
from mixmae_core.masking import pair_rows, swap_pairs, upsample_mask


@torch.no_grad()
def reconstruction_panels(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    stride: int,
    norm_pix: bool = True,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Return ``(B * 3, 3, H, W)`` in [0, 1]: per image its original, mixed input and reconstruction.

    ``images`` are the normalised model inputs; ``pred`` and ``mask`` come from ``MixMAEOutput``.
    Norm-pix predictions are mapped back with each target patch's own mean and std.
    """
    images, pred = images.float().cpu(), pred.float().cpu()
    B, C, H, W = images.shape
    grid = (H // stride, W // stride)
    if norm_pix:
        m, s = patch_stats(patchify(images, stride))
        pred = pred * s + m
    recon = unpatchify(pred, stride, grid, C)
    pixel_mask = upsample_mask(pair_rows(mask.cpu()), (H, W))[:, None]
    mixed = torch.where(pixel_mask, swap_pairs(images), images)
    panels = torch.stack([images, mixed, recon], dim=1).flatten(0, 1)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (panels * std_t + mean_t).clamp(0, 1)


def save_reconstruction_png(path: str | os.PathLike, images, pred, mask, stride: int, norm_pix: bool = True, max_pairs: int = 4) -> str:
    """Write a PNG grid: one row per pair, (original, mixed, reconstruction) of row 2k then of 2k+1."""
    n = min(images.shape[0], 2 * max_pairs)
    panels = reconstruction_panels(images[:n], pred[:n], mask[: n // 2], stride, norm_pix)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(panels, nrow=6, padding=2, pad_value=1.0), path)
    return str(path)


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
        from mixmae_core.metrics import binary_masks  # torchmetrics: seconds to import, pretraining never draws boxes

        image = draw_segmentation_masks(image, binary_masks(masks.cpu())[keep], 0.5, colours)
    names = [class_names[i] if class_names else str(i) for i in labels.tolist()]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores.cpu()[keep].tolist())]
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
