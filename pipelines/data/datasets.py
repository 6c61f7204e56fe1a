"""Ray Data pipelines that feed the Ray Train stages: one builder per task.

Every builder takes a ``source`` (a manifest file or a folder of packed shards, see
:func:`pipelines.data.manifest.open_source`) and a :class:`~pipelines.data.order.Shard`
(which worker, which epoch, from which position) and returns a lazy ``ray.data.Dataset``
that yields the shard's samples in order: a Ray Train worker builds its own, epoch by
epoch, and reads it with ``iter_torch_batches``. Each epoch has its own order (and
pairing): see :mod:`pipelines.data.order`; the samples are decoded by
:mod:`pipelines.data.samples`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import ray

from pipelines.data.manifest import DataSource, open_source
from pipelines.data.order import Shard, task_resources, unit_stream
from pipelines.data.quality import StageSkips
from pipelines.data.ray_internals import configure_execution
from pipelines.data.samples import (
    decode_classification,
    decode_detection,
    decode_pairs,
    decode_segmentation,
    stream_images,
)
from pipelines.data.transforms import CROP_RATIO, PRETRAIN_SCALE, RAND_AUGMENT, coco_targets

if TYPE_CHECKING:
    from mixmae_core.masking import MaskSpec


def _pipeline(
    source: DataSource,
    split: str,
    columns: list[str],
    decode: Callable[..., Iterator[dict]],
    *,
    shard: Shard,
    cpus: Optional[float],
    group: int,
    shuffle: bool,
    seed: int,
    max_packed_units: int,
    img_size: int,
    **decode_kwargs: Any,
) -> "ray.data.Dataset":
    """The shard's units of ``split`` (see :func:`pipelines.data.order.unit_stream`) decoded by
    ``decode``, in order; ``cpus``: what the decode tasks may use (None: the whole cluster)."""
    if cpus is None:
        cpus = cluster_cpus()
    ds, batch_size = unit_stream(
        source, split, columns, shard, group=group, shuffle=shuffle, seed=seed, max_packed_units=max_packed_units,
        cpus=cpus,
    )
    ds = ds.map_batches(decode, batch_size=batch_size, fn_kwargs=dict(img_size=img_size, **decode_kwargs),
                        **task_resources(cpus))
    # the context is shared with the datasets ``ds`` derives from, nobody else's
    block_bytes = None if source.packed else stream_images(img_size) * 3 * img_size * img_size
    configure_execution(ds.context, block_bytes, cpus, 1 / shard.world)
    return ds


def cluster_cpus() -> float:
    """The cluster's CPUs (joining or starting one as :class:`~pipelines.config.RaySettings` says)."""
    from pipelines.config import RaySettings

    if not ray.is_initialized():
        ray.init(address=RaySettings().cluster() or "local")
    return float(ray.cluster_resources().get("CPU", 1))


def pretrain_dataset(
    source: "str | Path | DataSource",
    *,
    split: str = "train",
    img_size: int = 224,
    masks: Optional["MaskSpec"] = None,
    seed: int = 0,
    shard: Shard = Shard(),
    cpus: Optional[float] = None,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: float = 0.5,
    draft: bool = True,
    skips: Optional[StageSkips] = None,
) -> "ray.data.Dataset":
    """Pretraining pairs: one row per pair with ``images`` (uint8 ``(2, 3, S, S)``, the two
    views, each RandomResizedCrop(scale, bicubic) + flip), ``masks`` (bool ``(2, h, w)``, drawn
    by the method's ``masks`` spec from the pair's seed; default MixMAE's at ratio 0.5),
    ``image_ids`` ``(2,)``, ``epoch`` and ``position``. Images are paired at random across the
    whole split, afresh every epoch; with an odd count one image sits the epoch out.
    Iterate with ``collate_fn=pipelines.data.collate.PairCollate()``.
    """
    if masks is None:
        from mixmae_core.masking import MaskSpec

        masks = MaskSpec((img_size // 32, img_size // 32), 0.5, "shared")
    return _pipeline(
        open_source(source), split, ["image_id", "path"], decode_pairs,
        shard=shard, cpus=cpus, group=2, shuffle=True, seed=seed, max_packed_units=64, img_size=img_size,
        masks=masks, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, draft=draft, skips=skips,
    )


def classification_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 224,
    train: bool,
    seed: int = 0,
    shard: Shard = Shard(),
    cpus: Optional[float] = None,
    auto_augment: Optional[str] = RAND_AUGMENT,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    skips: Optional[StageSkips] = None,
) -> "ray.data.Dataset":
    """Rows ``{"image": uint8 (3, S, S), "label": int64, "image_id": int64}``.

    ``train``: timm RandomResizedCrop(scale) + flip + RandAugment(``auto_augment``), order
    and augmentation drawn from ``(seed, epoch)``; random erasing and mixup/cutmix belong
    on the device. Eval: resize to ``img_size / crop_pct`` + center crop, manifest order.
    """
    return _pipeline(
        open_source(source), split, ["image_id", "path", "label"], decode_classification,
        group=1, shard=shard, cpus=cpus, shuffle=train, seed=seed, max_packed_units=64, img_size=img_size,
        train=train, transform=(auto_augment, crop_pct, interpolation, tuple(scale), hflip), skips=skips,
    )


def detection_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 512,
    train: bool,
    seed: int = 0,
    shard: Shard = Shard(),
    cpus: Optional[float] = None,
    skips: Optional[StageSkips] = None,
) -> "ray.data.Dataset":
    """COCO layout rows: ``image`` uint8 (3, S, S) letterboxed (longer side scaled to S,
    padded bottom/right), ``boxes`` float32 (n, 4) xyxy pixels in that frame, ``labels``
    int64 (n,) in 1..K, ``masks`` uint8 (n, S, S), ``image_id`` (the COCO id). Training
    flips horizontally with p=0.5 and drops crowd and sub-pixel boxes. Iterate with
    ``collate_fn=pipelines.data.collate.DetectionCollate()``; evaluate against :func:`coco_ground_truth`.
    """
    source = open_source(source)
    if source.layout != "coco":
        raise ValueError(f"detection reads the coco layout; {source.files[0]} is {source.layout}")
    return _pipeline(
        source, split, ["image_id", "path", "annotation"], decode_detection,
        group=1, shard=shard, cpus=cpus, shuffle=train, seed=seed, max_packed_units=16, img_size=img_size,
        train=train, category_ids=source.category_ids, skips=skips,
    )


def segmentation_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 512,
    train: bool,
    seed: int = 0,
    shard: Shard = Shard(),
    cpus: Optional[float] = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    skips: Optional[StageSkips] = None,
) -> "ray.data.Dataset":
    """ADE20K rows: ``image`` uint8 (3, S, S), ``label`` uint8 (S, S) with reduce-zero-label
    (0 -> 255 ignored, k -> k-1), ``image_id``. Training: random rescale (short side
    ``S * U(scale_range)``), pad, random S x S crop, flip. Eval: both resized to S x S
    (labels nearest), so mIoU is computed at S x S."""
    source = open_source(source)
    if source.annotation_kind != "label_map":
        raise ValueError(f"segmentation reads the ade20k layout; {source.files[0]} is {source.layout}")
    return _pipeline(
        source, split, ["image_id", "path", "annotation"], decode_segmentation,
        group=1, shard=shard, cpus=cpus, shuffle=train, seed=seed, max_packed_units=32, img_size=img_size,
        train=train, scale_range=tuple(scale_range), skips=skips,
    )


_BUILDERS = {
    "pretrain": pretrain_dataset,
    "classify": classification_dataset,
    "detect": detection_dataset,
    "segment": segmentation_dataset,
}


def build_dataset(kind: str, source: "str | Path | DataSource", **kwargs: Any) -> "ray.data.Dataset":
    """``build_dataset("pretrain" | "classify" | "detect" | "segment", source, **builder_kwargs)``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {list(_BUILDERS)}")
    return _BUILDERS[kind](source, **kwargs)


# --------------------------------------------------------------------------- evaluation


def coco_ground_truth(source: "str | Path | DataSource", *, split: str, img_size: int) -> dict:
    """The split's annotations as a pycocotools dataset dict in the frame the model sees
    (the :func:`detection_dataset` letterbox: images ``img_size`` x ``img_size``), with
    category ids 1..K matching the pipeline's labels. Predictions on pipeline images can
    be scored as they are::

        gt = COCO(); gt.dataset = coco_ground_truth(src, split="val", img_size=S); gt.createIndex()
        dt = gt.loadRes(detections)  # [{"image_id", "category_id", "bbox" (xywh), "score", "segmentation"}]

    Sizes come from the annotation file; crowd regions are kept with ``iscrowd`` = 1.
    """
    from pycocotools import mask as mask_utils

    source = open_source(source)
    index = {cid: k + 1 for k, cid in enumerate(source.category_ids)}
    table = source.table(split, ["image_id", "width", "height", "annotation"])
    images, annotations = [], []
    for row in table.to_pylist():
        images.append({"id": row["image_id"], "width": img_size, "height": img_size})
        targets = coco_targets(
            json.loads(row["annotation"] or "[]"), row["width"], row["height"], img_size, index, train=False
        )
        for box, label, mask, crowd in zip(targets["boxes"], targets["labels"], targets["masks"], targets["iscrowd"]):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": row["image_id"],
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask_utils.area(rle)),
                    "segmentation": rle,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(source.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}
