"""Per-image transforms of the data pipeline. All of them return uint8 ``(3, H, W)`` arrays:
normalisation (:func:`pipelines.data.collate.normalize_on_device`), random erasing and
mixup/cutmix run on the device over whole batches. No torch at import: see ``datasets``."""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data.decode import DecodeResult, Source, decode_image, to_chw

IGNORE_INDEX = 255
#: MixMAE's pretraining augmentation (RandomResizedCrop scale range, bicubic, flip only).
PRETRAIN_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def sample_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(left, top, w, h)``, same distribution as torchvision's
    ``RandomResizedCrop.get_params`` but drawn from ``rng`` so every pair is reproducible."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    src: Source,
    rng: np.random.Generator,
    img_size: int,
    *,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: float = 0.5,
    draft: bool = True,
) -> tuple[DecodeResult, Optional[np.ndarray]]:
    """Decode ``src`` and take one RandomResizedCrop (bicubic) + horizontal flip view.

    The crop box is drawn from the header size before any pixel is decoded. With ``draft``,
    a JPEG is then decoded at the smallest 1/2, 1/4 or 1/8 scale at which the box still
    spans at least ``img_size`` pixels on both sides, so the final resize only ever
    shrinks, as it would from the full image; crops that get enlarged decode in full.
    """
    box: list[tuple[int, int, int, int]] = []

    def plan(size: tuple[int, int]) -> Optional[tuple[int, int]]:
        box.append(sample_resized_crop(size[0], size[1], rng, scale, ratio))
        _, _, w, h = box[0]
        return (math.ceil(size[0] * img_size / w), math.ceil(size[1] * img_size / h)) if draft else None

    result = decode_image(src, draft=plan)
    if result.image is None:
        return result, None
    left, top, w, h = box[0]
    r = result.reduction
    view = result.image.resize(
        (img_size, img_size), Image.Resampling.BICUBIC, box=(left / r, top / r, (left + w) / r, (top + h) / r)
    )
    if rng.random() < hflip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return result, to_chw(view)


@lru_cache(maxsize=8)
def classification_transform(
    img_size: int,
    train: bool,
    auto_augment: Optional[str] = RAND_AUGMENT,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
) -> Callable[[Image.Image], np.ndarray]:
    """timm's ImageNet transforms without the tensor/normalise tail (``use_prefetcher``):
    train = RandomResizedCrop + flip + RandAugment; eval = resize to ``img_size / crop_pct``
    + center crop. Returns a PIL -> uint8 ``(3, H, W)`` function (cached per process)."""
    # timm costs seconds to import; data workers that never classify should not pay it.
    from timm.data import create_transform

    tf = create_transform(
        img_size,
        is_training=train,
        auto_augment=auto_augment if train else None,
        crop_pct=crop_pct,
        interpolation=interpolation,
        scale=scale,
        hflip=hflip,
        use_prefetcher=True,
    )
    return lambda img: np.ascontiguousarray(tf(img).numpy())


def seed_global_rngs(seed: int) -> None:
    """timm's transforms draw from the ``random``, NumPy and torch global generators."""
    import torch  # here, not at load: the decode path imports no torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def letterbox_size(width: int, height: int, img_size: int) -> tuple[int, int]:
    """Content size after scaling the longer side to ``img_size`` (aspect ratio kept)."""
    s = img_size / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def letterbox(img: Image.Image, img_size: int, flip: bool = False) -> np.ndarray:
    """Scale the longer side to ``img_size`` and pad bottom/right with zeros to a square.

    The content sits at the top-left, so coordinates only scale (no offset); a flip mirrors
    the content, not the padding.
    """
    cw, ch = letterbox_size(*img.size, img_size)
    content = img.resize((cw, ch), Image.Resampling.BILINEAR)
    if flip:
        content = content.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    canvas = np.zeros((3, img_size, img_size), np.uint8)
    canvas[:, :ch, :cw] = to_chw(content)
    return canvas


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def coco_targets(
    annotations: list[dict],
    width: int,
    height: int,
    img_size: int,
    category_index: dict[int, int],
    *,
    flip: bool = False,
    train: bool = True,
) -> dict[str, np.ndarray]:
    """Annotations of one image in the letterboxed ``img_size`` frame of :func:`letterbox`.

    ``labels`` are contiguous 1..K (``category_index`` maps COCO ids to them); ``masks``
    are ``(n, img_size, img_size)`` uint8. ``train`` drops crowd regions and boxes under
    one pixel (torchvision's detection training convention); evaluation keeps everything.
    """
    cw, ch = letterbox_size(width, height, img_size)
    sx, sy = cw / width, ch / height
    boxes, labels, masks, crowd = [], [], [], []
    for ann in annotations:
        is_crowd = int(ann.get("iscrowd", 0))
        if ann["category_id"] not in category_index or (train and is_crowd):
            continue
        x, y, w, h = ann["bbox"]
        box = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy], np.float32)
        box[0::2] = box[0::2].clip(0, cw)
        box[1::2] = box[1::2].clip(0, ch)
        if train and (box[2] - box[0] < 1 or box[3] - box[1] < 1):
            continue
        full = mask_utils.decode(segmentation_rle(ann["segmentation"], height, width))
        scaled = np.asarray(Image.fromarray(full * 255).resize((cw, ch), Image.Resampling.NEAREST)) > 127
        mask = np.zeros((img_size, img_size), np.uint8)
        if flip:
            box = np.array([cw - box[2], box[1], cw - box[0], box[3]], np.float32)
            scaled = scaled[:, ::-1]
        mask[:ch, :cw] = scaled
        boxes.append(box)
        labels.append(category_index[ann["category_id"]])
        masks.append(mask)
        crowd.append(is_crowd)
    return {
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.array(labels, np.int64),
        "masks": np.array(masks, np.uint8).reshape(-1, img_size, img_size),
        "iscrowd": np.array(crowd, np.int64),
    }


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """ADE20K convention: 0 ("other") becomes the ignore index 255, class k becomes k - 1."""
    lut = (np.arange(256) - 1).astype(np.uint8)
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[labels]


def segmentation_sample(
    img: Image.Image,
    labels: np.ndarray,
    img_size: int,
    rng: Optional[np.random.Generator] = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, reduced label map) sample at ``img_size`` x ``img_size``.

    Training (``rng`` given): scale so the short side is ``img_size * U(scale_range)``,
    pad (image 0, label 255) to at least ``img_size``, random crop, flip with p=0.5.
    Evaluation: resize both to ``img_size`` x ``img_size`` (label nearest), so mIoU is
    measured in that frame.
    """
    label_img = Image.fromarray(reduce_zero_label(labels))
    if rng is None:
        size = (img_size, img_size)
        return (
            to_chw(img.resize(size, Image.Resampling.BICUBIC)),
            np.asarray(label_img.resize(size, Image.Resampling.NEAREST)),
        )
    s = img_size * rng.uniform(*scale_range) / min(img.size)
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    image = to_chw(img.resize(size, Image.Resampling.BICUBIC))
    label = np.asarray(label_img.resize(size, Image.Resampling.NEAREST))
    pad_h, pad_w = max(0, img_size - size[1]), max(0, img_size - size[0])
    image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(0, label.shape[0] - img_size + 1))
    left = int(rng.integers(0, label.shape[1] - img_size + 1))
    image = image[:, top : top + img_size, left : left + img_size]
    label = label[top : top + img_size, left : left + img_size]
    if rng.random() < 0.5:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
