"""Decoding per task: unit rows (paths or encoded bytes) into the uint8 samples each task trains on.

Every decoder runs inside a Ray Data task, never raises for a bad image (it is counted
and skipped, see :mod:`pipelines.data.quality`) and yields a block every
:func:`stream_images` images, so a long task's first images reach the trainer while it
still decodes. torch is imported only where pairs are decoded: every process that
unpickles a dataset imports this module, and only the decode tasks need it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np

from pipelines.data.decode import decode_image, decode_label_map
from pipelines.data.order import PAIR
from pipelines.data.quality import PARTNER_SKIPPED, StageSkips, Tally
from pipelines.data.transforms import (
    CROP_RATIO,
    PRETRAIN_SCALE,
    classification_transform,
    coco_targets,
    letterbox,
    random_resized_crop,
    seed_global_rngs,
    segmentation_sample,
)

if TYPE_CHECKING:
    from mixmae_core.masking import MaskSpec

#: Decoded bytes per block a decode task yields (64 images at 224 px). Storing a block
#: costs its task about the same whatever its size, so blocks are not smaller.
STREAM_BLOCK_BYTES = 64 * 3 * 224 * 224


def stream_images(img_size: int) -> int:
    """Images per block yielded by a decode task at ``img_size``: :data:`STREAM_BLOCK_BYTES`
    of uint8 RGB."""
    return max(1, STREAM_BLOCK_BYTES // (3 * img_size * img_size))


def _image_src(batch: dict, i: int, suffix: str = "") -> Any:
    key = "image_bytes" + suffix
    return batch[key][i] if key in batch else batch["path" + suffix][i]


def _ragged(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def decode_pairs(
    batch: dict,
    *,
    img_size: int,
    masks: "MaskSpec",
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: float = 0.5,
    draft: bool = True,
    skips: Optional[StageSkips] = None,
) -> Iterator[dict]:
    """Pair units -> ``images`` uint8 ``(P, 2, 3, S, S)``, ``masks`` bool ``(P, 2, h, w)`` (each
    image's, as the method's ``masks`` spec draws them), ``image_ids`` ``(P, 2)``, ``position``
    ``(P,)`` (the unit's in its shard).

    Both views and the masks are drawn from the unit's ``seed``. A pair with a skipped
    image is dropped; the skipped image counts under its reason, its partner under
    ``partner_skipped``. Yields a block every :func:`stream_images` images (none when
    every pair was dropped: Ray Data cannot store an empty tensor column).
    """
    per_block = stream_images(img_size)
    tally, rows = Tally(), _Rows()
    for i in range(len(batch["seed"])):
        seed = int(batch["seed"][i])
        views = [
            random_resized_crop(
                _image_src(batch, i, s), np.random.default_rng([seed, j]), img_size,
                scale=scale, ratio=ratio, hflip=hflip, draft=draft,
            )
            for j, s in enumerate(PAIR)
        ]
        paths = [str(batch["path" + s][i]) for s in PAIR]
        usable = all(view is not None for _, view in views)
        for path, (result, _) in zip(paths, views):
            if usable or result.image is None:
                tally.add(path, result)
            else:
                tally.skip(path, PARTNER_SKIPPED)
        if not usable:
            continue
        rows.append(
            images=[view for _, view in views],
            masks=masks.draw(seed).numpy(),
            image_ids=[int(batch["image_id" + s][i]) for s in PAIR], epoch=int(batch["epoch"][i]),
            position=int(batch["position"][i]),
        )
        if 2 * len(rows) >= per_block:
            yield _pair_block(rows.take())
    tally.flush(skips)
    if len(rows):
        yield _pair_block(rows.take())


def _pair_block(out: dict[str, list]) -> dict[str, np.ndarray]:
    pairs = len(out["images"])
    images = np.stack([view for pair in out["images"] for view in pair])  # one copy, not a stack per pair
    return {
        "images": images.reshape(pairs, 2, *images.shape[1:]),
        "masks": np.stack(out["masks"]),
        "image_ids": np.array(out["image_ids"], np.int64),
        "epoch": np.array(out["epoch"], np.int64),
        "position": np.array(out["position"], np.int64),
    }


class _Rows:
    """Output fields accumulated row by row until a block is taken."""

    def __init__(self) -> None:
        self.fields: dict[str, list] = {}

    def append(self, **fields: Any) -> None:
        for k, v in fields.items():
            self.fields.setdefault(k, []).append(v)

    def __len__(self) -> int:
        return len(next(iter(self.fields.values()), []))

    def take(self) -> dict[str, list]:
        out, self.fields = self.fields, {}
        return out


def _decode_rows(
    batch: dict, skips: Optional[StageSkips], sample: Callable[[Any, int], Any], img_size: int
) -> Iterator[dict[str, list]]:
    """Decode each row's image and let ``sample(result, i)`` turn it into output fields
    (or a skip reason string); yields the fields, with ``image_id`` and ``position``, as
    lists every :func:`stream_images` rows (nothing when all were skipped: Ray Data cannot
    store an empty tensor column)."""
    tally, rows, per_block = Tally(), _Rows(), stream_images(img_size)
    for i in range(len(batch["image_id"])):
        path = str(batch["path"][i])
        result = decode_image(_image_src(batch, i))
        fields = sample(result, i) if result.image is not None else None
        if isinstance(fields, str):
            tally.skip(path, fields)
            continue
        tally.add(path, result)
        if fields is None:
            continue
        rows.append(**fields, image_id=int(batch["image_id"][i]), position=int(batch["position"][i]))
        if len(rows) >= per_block:
            yield rows.take()
    tally.flush(skips)
    if len(rows):
        yield rows.take()


def _ids(out: dict[str, list]) -> dict[str, np.ndarray]:
    return {"image_id": np.array(out["image_id"], np.int64), "position": np.array(out["position"], np.int64)}


def decode_classification(
    batch: dict, *, img_size: int, train: bool, transform: tuple, skips: Optional[StageSkips] = None
) -> Iterator[dict]:
    tf = classification_transform(img_size, train, *transform)

    def sample(result, i):
        if train:
            seed_global_rngs(int(batch["seed"][i]))
        return {"image": tf(result.image), "label": int(batch["label"][i])}

    for out in _decode_rows(batch, skips, sample, img_size):
        yield {"image": np.stack(out["image"]), "label": np.array(out["label"], np.int64), **_ids(out)}


def decode_detection(
    batch: dict, *, img_size: int, train: bool, category_ids: tuple, skips: Optional[StageSkips] = None
) -> Iterator[dict]:
    index = {cid: k + 1 for k, cid in enumerate(category_ids)}

    def sample(result, i):
        flip = train and np.random.default_rng(int(batch["seed"][i])).random() < 0.5
        targets = coco_targets(
            json.loads(batch["annotation"][i] or "[]"), *result.image.size, img_size, index, flip=flip, train=train
        )
        return {"image": letterbox(result.image, img_size, flip), **{k: targets[k] for k in ("boxes", "labels", "masks")}}

    for out in _decode_rows(batch, skips, sample, img_size):
        yield {
            "image": np.stack(out["image"]),
            **{k: _ragged(out[k]) for k in ("boxes", "labels", "masks")},
            **_ids(out),
        }


def decode_segmentation(
    batch: dict, *, img_size: int, train: bool, scale_range: tuple[float, float], skips: Optional[StageSkips] = None
) -> Iterator[dict]:
    def sample(result, i):
        src = batch["annotation_bytes"][i] if "annotation_bytes" in batch else batch["annotation"][i]
        labels = decode_label_map(src, expected_size=result.image.size)
        if isinstance(labels, str):
            return labels
        rng = np.random.default_rng(int(batch["seed"][i])) if train else None
        image, label = segmentation_sample(result.image, labels, img_size, rng, scale_range)
        return {"image": image, "label": label}

    for out in _decode_rows(batch, skips, sample, img_size):
        yield {"image": np.stack(out["image"]), "label": np.stack(out["label"]), **_ids(out)}

