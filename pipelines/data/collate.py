"""Worker side of the data pipeline: Ray Data rows into torch batches on the device.

Kept apart from :mod:`pipelines.data.datasets` so that the processes which only plan or
coordinate a dataset (they unpickle its operators) never import torch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.util.torch_utils import convert_ndarray_to_torch_tensor


def normalize_on_device(
    images: torch.Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` (values 0..255) to normalised floats, on the images' device.

    ``mean``/``std`` default to timm's ``IMAGENET_DEFAULT_MEAN``/``IMAGENET_DEFAULT_STD``.
    """
    if mean is None or std is None:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
    scale = torch.tensor(std, device=images.device, dtype=dtype).mul(255.0).view(1, -1, 1, 1)
    shift = torch.tensor(mean, device=images.device, dtype=dtype).mul(255.0).view(1, -1, 1, 1)
    return (images.to(dtype) - shift) / scale


class PairCollate(NumpyBatchCollateFn):
    """Pairs -> ``{"images": uint8 (2P, 3, S, S), "masks": bool (2P, h, w), "image_ids": int64 (2P,),
    "position": int64 (P,)}``.

    Rows ``2k`` and ``2k+1`` of ``images`` are pair ``k``, as ``mixmae_core`` expects, so
    ``iter_torch_batches(batch_size=P)`` yields ``2P`` images. A pair row holds both views
    in one ``(2, 3, S, S)`` tensor, so this layout is a reshape, not a copy. The dict of
    tensors is moved to the worker's device by ``iter_torch_batches``; on the CPU,
    ``images`` and ``image_ids`` may share the object store's read-only memory (as Ray's
    own default collation does), so clone before writing to them in place.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        return {
            "images": convert_ndarray_to_torch_tensor(images.reshape(-1, *images.shape[2:])),
            "masks": torch.from_numpy(np.array(batch["masks"], dtype=bool).reshape(-1, *batch["masks"].shape[2:])),
            "image_ids": convert_ndarray_to_torch_tensor(batch["image_ids"].reshape(-1)),
            "position": torch.from_numpy(np.asarray(batch["position"], np.int64)),
        }


class DetectionCollate(NumpyBatchCollateFn):
    """Rows -> ``{"images", "targets", "image_id", "position"}`` in torchvision detection
    style: a list of uint8 ``(3, S, S)`` tensors and a list of ``{"boxes", "labels", "masks",
    "image_id"}`` dicts. Left on the CPU (lists of dicts are not moved by ``iter_torch_batches``)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        images = [torch.from_numpy(np.array(image)) for image in batch["image"]]
        targets = [
            {
                "boxes": torch.from_numpy(np.array(boxes, np.float32).reshape(-1, 4)),
                "labels": torch.from_numpy(np.array(labels, np.int64).reshape(-1)),
                "masks": torch.from_numpy(np.array(masks, np.uint8).reshape(-1, *images[k].shape[1:])),
                "image_id": torch.tensor(int(image_id)),
            }
            for k, (boxes, labels, masks, image_id) in enumerate(
                zip(batch["boxes"], batch["labels"], batch["masks"], batch["image_id"])
            )
        ]
        return {"images": images, "targets": targets, "image_id": torch.from_numpy(np.asarray(batch["image_id"], np.int64)),
                "position": torch.from_numpy(np.asarray(batch["position"], np.int64))}
