"""Ray Data pipelines that feed the Ray Train stages.

Every builder takes a ``source`` (a manifest file or a folder of packed shards, see
:func:`pipelines.data.manifest.open_source`) and returns a lazy ``ray.data.Dataset`` to
hand to ``TorchTrainer(datasets=...)``; workers read their shard with
``ray.train.get_dataset_shard(name).iter_torch_batches(...)``.

Epochs. A training dataset draws a fresh order (and, for pretraining, a fresh pairing) on
every execution: execution ``k`` of the returned Dataset is epoch ``epoch + k``, and
everything random in it is a function of ``(seed, epoch)`` only. A Ray Train shard
executes it once per ``iter_torch_batches`` call, so ``for epoch ...: for batch in
shard.iter_torch_batches(...)`` sees epochs ``epoch, epoch + 1, ...``. When resuming, build
the dataset with ``epoch=`` the first epoch still to run. Executing the dataset (or one
derived from it) outside the training loop, e.g. ``count()``, also advances the epoch.

Order. The shuffled sequence is cut into units (single rows, or pairs for pretraining);
a unit travels as one Ray Data row, so no block split, shuffle or ``streaming_split``
can separate a pair. For a manifest the units are emitted straight from a per-epoch
permutation (streaming, nothing moves but paths). Packed shards hold the bytes, so
partners are brought together with a sort-based group-by on the unit (one exchange of
the encoded bytes per epoch); both give identical units for the same ``(seed, epoch)``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import DataContext
from ray.data.context import ShuffleStrategy

from pipelines.data.decode import decode_image, decode_label_map
from pipelines.data.manifest import DataSource, open_source
from pipelines.data.quality import PARTNER_SKIPPED, SkipSink, Tally
from pipelines.data.transforms import (
    CROP_RATIO,
    PRETRAIN_SCALE,
    RAND_AUGMENT,
    classification_transform,
    coco_targets,
    letterbox,
    random_resized_crop,
    seed_global_rngs,
    segmentation_sample,
)

#: Column suffixes of the two images of a pair (rows 2k and 2k+1 of a collated batch).
PAIR = ("_a", "_b")
#: Stride of the coarsest encoder stage; MixMAE's mixing mask lives on that grid.
MASK_STRIDE = 32
#: Target encoded bytes per group when packed shards are regrouped into units.
_GROUP_BYTES = 64 * 2**20
#: Decoded bytes per block yielded from a running task (64 images at 224 px): a task's
#: first images reach the trainer long before the task ends, so tasks can be large (few
#: scheduling gaps). Each block costs its task about 3.5 ms to store whatever its size,
#: so blocks are not smaller: at 32 images, that was 4% of a 224-px decode task.
STREAM_BLOCK_BYTES = 64 * 3 * 224 * 224
#: Blocks a decode task may have waiting for the driver before it pauses (77 MB).
STREAM_GEN_BUFFER_BLOCKS = 8
#: Decoded bytes the pipeline may hold ready, as a multiple of what its consumer has
#: prefetched, before Ray Data stops reading its decode tasks' output (Ray's default: 2).
DOWNSTREAM_QUEUE_RATIO = 8.0
#: Fewest images per decode task: below this, Ray's per-task cost (scheduling, arguments,
#: the skip counts it sends) outweighs the decoding on small datasets.
MIN_TASK_IMAGES = 32
#: Most images per decode task read from a manifest (about 10 s of decoding at 224 px):
#: a core idles ~0.1 s between two tasks (Ray Data polls for finished tasks every 0.1 s),
#: so tasks are long, but bounded so a retried task redoes little. Packed shards are
#: bounded by the builder's ``max_packed_units`` (their task input is the encoded bytes).
MAX_TASK_IMAGES = 2048

Counter = Optional[SkipSink]


# --------------------------------------------------------------------------- units


def _execution_index() -> int:
    # Ray Data's own per-epoch reseeding (RandomSeedConfig, FileShuffleConfig) keys on this
    # counter; the streaming executor bumps it after each execution and ships it to tasks.
    return DataContext.get_current()._execution_idx


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@lru_cache(maxsize=4)
def _unit_seeds(n_units: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).integers(0, 2**63 - 1, n_units, dtype=np.int64)


@lru_cache(maxsize=4)
def _position_lookup(ids: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids and their manifest positions; ``ids`` travel as bytes so the cache can key on them."""
    values = np.frombuffer(ids, np.int64)
    sorter = np.argsort(values, kind="stable")
    return values[sorter], sorter


def _units(rows: pa.Table, unit_idx: np.ndarray, group: int, seeds: Optional[np.ndarray], epoch: int) -> dict:
    """``rows`` hold consecutive units of ``group`` rows each; one output row per unit."""
    out: dict[str, np.ndarray] = {}
    for name in rows.column_names:
        values = rows.column(name).to_numpy(zero_copy_only=False)
        if group == 1:
            out[name] = values
        else:
            for j, suffix in enumerate(PAIR[:group]):
                out[name + suffix] = values[j::group]
    out["seed"] = seeds[unit_idx] if seeds is not None else np.zeros(len(unit_idx), np.int64)
    out["epoch"] = np.full(len(unit_idx), epoch, np.int64)
    return out


def units_for_chunk(table: pa.Table, c: int, *, chunk: int, group: int, shuffle: bool, seed: int, epoch: int) -> dict:
    """Units ``[c*chunk, (c+1)*chunk)`` of ``table``'s order in ``epoch`` (manifest order
    when not ``shuffle``) as a numpy batch: what the pipeline decodes for that chunk."""
    n_units = table.num_rows // group
    unit_idx = np.arange(c * chunk, min(n_units, (c + 1) * chunk))
    rows_idx = (unit_idx[:, None] * group + np.arange(group)).ravel()
    if not shuffle:
        return _units(table.take(rows_idx), unit_idx, group, None, epoch)
    rows = table.take(_epoch_order(table.num_rows, seed, epoch)[rows_idx])
    return _units(rows, unit_idx, group, _unit_seeds(n_units, seed, epoch), epoch)


def _emit_units(batch: dict, *, table: Any, shuffle: bool, epoch0: int, **kwargs: Any) -> dict:
    table = ray.get(table[0])
    epoch = epoch0 + _execution_index() if shuffle else epoch0
    parts = [units_for_chunk(table, int(c), shuffle=shuffle, epoch=epoch, **kwargs) for c in batch["id"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rank_rows(batch: pa.Table, *, ids: Any, group: int, seed: int, epoch0: int, n_buckets: int) -> pa.Table:
    """Packed rows tagged with their rank in this epoch's order and the bucket of their unit."""
    epoch = epoch0 + _execution_index()
    sorted_ids, sorter = _position_lookup(ray.get(ids[0]))
    n = len(sorted_ids)
    rank = np.empty(n, np.int64)
    rank[_epoch_order(n, seed, epoch)] = np.arange(n)
    positions = sorter[np.searchsorted(sorted_ids, batch.column("image_id").to_numpy())]
    ranks = rank[positions]
    keep = ranks < (n // group) * group  # an odd image out sits this epoch out
    ranks = ranks[keep]
    batch = batch.filter(pa.array(keep)).append_column("_rank", pa.array(ranks))
    batch = batch.append_column("_bucket", pa.array((ranks // group) % n_buckets))
    return batch.append_column("_epoch", pa.array(np.full(len(ranks), epoch, np.int64)))


def _zip_units(group_rows: pa.Table, *, group: int, seed: int, n_units: int) -> dict:
    rows = group_rows.sort_by("_rank")
    unit_idx = rows.column("_rank").to_numpy()[::group] // group
    epoch = int(rows.column("_epoch")[0].as_py())
    return _units(rows.drop_columns(["_rank", "_epoch", "_bucket"]), unit_idx, group, _unit_seeds(n_units, seed, epoch), epoch)


def _read_shards(batch: dict, *, columns: list[str], split: str) -> Iterator[pa.Table]:
    """The ``split`` rows of the packed shards named in ``batch``, one row group at a time."""
    for path in batch["file"]:
        shard = pq.ParquetFile(str(path))
        for i in range(shard.num_row_groups):
            rows = shard.read_row_group(i, columns=columns + ["split"])
            rows = rows.filter(pc.field("split") == split).drop_columns(["split"])
            if rows.num_rows:
                yield rows


def _as_units(batch: pa.Table, *, epoch: int) -> dict:
    return _units(batch, np.arange(batch.num_rows), 1, None, epoch)


def _cluster_cpus() -> int:
    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def units_per_task(n_units: int, group: int, cpus: int, max_units: int) -> int:
    """Units one decode task handles: the split is cut into waves of one task per CPU,
    as few waves as ``max_units`` allows, so tasks are long (few scheduling gaps) and of
    equal size (the cores finish an epoch together rather than one core finishing it
    alone); never below :data:`MIN_TASK_IMAGES` (a task must be worth starting)."""
    waves = math.ceil(n_units / (cpus * max_units))
    return min(max_units, max(math.ceil(MIN_TASK_IMAGES / group), math.ceil(n_units / (cpus * waves))))


def _unit_stream(
    source: DataSource,
    split: str,
    columns: list[str],
    *,
    group: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    max_packed_units: int,
) -> tuple["ray.data.Dataset", Optional[int]]:
    """The split's rows as a dataset of units (see module docstring) and the batch size the
    decoding step should use on it."""
    if source.packed:
        columns = columns + ["image_bytes"] + (["annotation_bytes"] if source.annotation_kind == "label_map" else [])
    ids = source.table(split, ["image_id"]).column("image_id").to_numpy()
    if len(ids) < group:
        raise ValueError(f"split {split!r} of {source.files[0]} has {len(ids)} images; need at least {group}")
    n_units = len(ids) // group
    max_units = max_packed_units if source.packed else math.ceil(MAX_TASK_IMAGES / group)
    per_task = units_per_task(n_units, group, _cluster_cpus(), max_units)
    if not source.packed:
        table_ref = ray.put(source.table(split, columns))
        n_chunks = math.ceil(n_units / per_task)
        ds = ray.data.from_items([{"id": c} for c in range(n_chunks)], override_num_blocks=n_chunks).map_batches(
            _emit_units,
            batch_size=1,
            fn_kwargs=dict(table=[table_ref], group=group, shuffle=shuffle, seed=seed, epoch0=epoch, chunk=per_task),
        )
        # Whole blocks: a batch size here would be fused into the emitting step's input
        # bundling and pack many chunks into one task, serialising the decode.
        return ds, None
    # Shards are read by plain tasks: ray.data.read_parquet lists files in a task that
    # needs a fresh worker process (seconds of imports) on every execution, i.e. every epoch.
    ds = ray.data.from_items([{"file": f} for f in source.files], override_num_blocks=len(source.files))
    ds = ds.map_batches(_read_shards, batch_size=1, fn_kwargs=dict(columns=columns, split=split))
    if not shuffle:
        return ds.map_batches(_as_units, batch_format="pyarrow", fn_kwargs=dict(epoch=epoch)), per_task
    metadata = [pq.read_metadata(f) for f in source.files]
    encoded = sum(m.row_group(i).total_byte_size for m in metadata for i in range(m.num_row_groups))
    n_buckets = max(1, min(n_units, max(math.ceil(n_units / per_task), math.ceil(encoded / _GROUP_BYTES))))
    ds = ds.map_batches(
        _rank_rows,
        batch_format="pyarrow",
        fn_kwargs=dict(
            ids=[ray.put(ids.astype(np.int64).tobytes())], group=group, seed=seed, epoch0=epoch, n_buckets=n_buckets
        ),
    )
    # The default hash shuffle starts aggregator actors per partition: far slower on small clusters.
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = ds.groupby("_bucket").map_groups(
        _zip_units, batch_format="pyarrow", fn_kwargs=dict(group=group, seed=seed, n_units=n_units)
    )
    return ds, per_task


# --------------------------------------------------------------------------- decoding UDFs


def _image_src(batch: dict, i: int, suffix: str = "") -> Any:
    key = "image_bytes" + suffix
    return batch[key][i] if key in batch else batch["path" + suffix][i]


def _ragged(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _pipeline(
    source: DataSource,
    split: str,
    columns: list[str],
    decode: Callable[..., Iterator[dict]],
    *,
    group: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    max_packed_units: int,
    img_size: int,
    **decode_kwargs: Any,
) -> "ray.data.Dataset":
    """Units of ``split`` (see :func:`_unit_stream`) decoded by ``decode``."""
    ds, batch_size = _unit_stream(
        source, split, columns, group=group, shuffle=shuffle, seed=seed, epoch=epoch,
        max_packed_units=max_packed_units,
    )
    ds = ds.map_batches(decode, batch_size=batch_size, fn_kwargs=dict(img_size=img_size, **decode_kwargs))
    ctx = ds.context  # shared with the datasets ``ds`` derives from, nobody else's
    if not source.packed:
        # Ray Data merges a task's yields into blocks up to this size; one yield per block
        # lets the first images of a long task reach the consumer while it still decodes.
        # (Not for packed shards: it would also cut their read and shuffle into tiny blocks.)
        ctx.target_max_block_size = stream_images(img_size) * 3 * img_size * img_size
        # A task pauses once this many of its blocks wait for the driver. The driver takes
        # a task's next block only after a background thread fetched the previous block's
        # metadata and a scheduling step (up to 0.1 s apart) emitted it, so a fast task
        # outruns it for a while. A lone decode task (1 CPU, 2,400-image epochs of 6-8 s,
        # 32-image blocks) sat blocked in yield for 0.9-1.1 s per epoch with Ray's default
        # of 2, 0.4-0.6 s with 4, and 0.25-0.3 s with 16: only the storing of its blocks,
        # no wait over 15 ms. 8 blocks of 64 images give the same 0.5 s of slack.
        ctx._max_num_blocks_in_streaming_gen_buffer = STREAM_GEN_BUFFER_BLOCKS
    # Ray Data weighs every live block of the last step (queued, awaiting its metadata,
    # or already inside the consumer's iterator being formatted and collated) against
    # only the bytes the consumer reports prefetched. With a consumer that keeps up that
    # read 3-4 blocks against 1, over Ray's ratio of 2; once over, Ray reads one block
    # per two scheduling steps (0.2 s), and only while the consumer starves. A lone
    # decode task (1 CPU, 2,400-image epochs) was throttled from 0.7 s into most epochs,
    # stalled in yield for up to 0.9 s, and its successor started 0.17 s late. At 8 the
    # throttle never fired, and a slow consumer still bounds what is held.
    ctx.downstream_capacity_backpressure_ratio = DOWNSTREAM_QUEUE_RATIO
    # Per-operator reservations are sized from what Ray Data's rate-based cluster autoscaler
    # has reserved for the execution, which starts at one CPU and grows with measured
    # throughput. Every epoch is a new execution, so with reservations most of an epoch
    # ran one decode task at a time (2-CPU benchmark: 0.6x the DataLoader; without: 0.8x).
    # Object-store backpressure from the other policies stays in force.
    ctx.op_resource_reservation_enabled = False
    return ds


def stream_images(img_size: int) -> int:
    """Images per block yielded by a decode task at ``img_size``: :data:`STREAM_BLOCK_BYTES`
    of uint8 RGB."""
    return max(1, STREAM_BLOCK_BYTES // (3 * img_size * img_size))


def mask_grid(img_size: int) -> tuple[int, int]:
    if img_size % MASK_STRIDE:
        raise ValueError(f"img_size must be a multiple of {MASK_STRIDE} (the mask grid stride), got {img_size}")
    return img_size // MASK_STRIDE, img_size // MASK_STRIDE


def decode_pairs(
    batch: dict,
    *,
    img_size: int,
    mask_ratio: float,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: float = 0.5,
    draft: bool = True,
    counter: Counter = None,
) -> Iterator[dict]:
    """Pair units -> ``images`` uint8 ``(P, 2, 3, S, S)``, ``mask`` bool ``(P, h, w)``,
    ``image_ids`` ``(P, 2)``.

    Both views and the mask are drawn from the unit's ``seed``. A pair with a skipped
    image is dropped; the skipped image counts under its reason, its partner under
    ``partner_skipped``. Yields a block every :func:`stream_images` images (none when
    every pair was dropped: Ray Data cannot store an empty tensor column).
    """
    # Imported here, not with the module: every process that unpickles the dataset (Ray
    # Train's dataset manager, split coordinators) imports this module, and torch and timm
    # cost seconds each; only the processes that decode pairs need them.
    import torch
    from mixmae_core.masking import sample_mask

    grid, per_block = mask_grid(img_size), stream_images(img_size)
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
            mask=sample_mask(1, grid, mask_ratio, generator=torch.Generator().manual_seed(seed))[0].numpy(),
            image_ids=[int(batch["image_id" + s][i]) for s in PAIR], epoch=int(batch["epoch"][i]),
        )
        if 2 * len(rows) >= per_block:
            yield _pair_block(rows.take())
    tally.flush(counter)
    if len(rows):
        yield _pair_block(rows.take())


def _pair_block(out: dict[str, list]) -> dict[str, np.ndarray]:
    pairs = len(out["images"])
    images = np.stack([view for pair in out["images"] for view in pair])  # one copy, not a stack per pair
    return {
        "images": images.reshape(pairs, 2, *images.shape[1:]),
        "mask": np.stack(out["mask"]),
        "image_ids": np.array(out["image_ids"], np.int64),
        "epoch": np.array(out["epoch"], np.int64),
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
    batch: dict, counter: Counter, sample: Callable[[Any, int], Any], img_size: int
) -> Iterator[dict[str, list]]:
    """Decode each row's image and let ``sample(result, i)`` turn it into output fields
    (or a skip reason string); yields the fields as lists every :func:`stream_images` rows
    (nothing when all were skipped: Ray Data cannot store an empty tensor column)."""
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
        rows.append(**fields, image_id=int(batch["image_id"][i]))
        if len(rows) >= per_block:
            yield rows.take()
    tally.flush(counter)
    if len(rows):
        yield rows.take()


def decode_classification(
    batch: dict, *, img_size: int, train: bool, transform: tuple, counter: Counter = None
) -> Iterator[dict]:
    tf = classification_transform(img_size, train, *transform)

    def sample(result, i):
        if train:
            seed_global_rngs(int(batch["seed"][i]))
        return {"image": tf(result.image), "label": int(batch["label"][i])}

    for out in _decode_rows(batch, counter, sample, img_size):
        yield {"image": np.stack(out["image"]), "label": np.array(out["label"], np.int64), "image_id": np.array(out["image_id"])}


def decode_detection(
    batch: dict, *, img_size: int, train: bool, category_ids: tuple, counter: Counter = None
) -> Iterator[dict]:
    index = {cid: k + 1 for k, cid in enumerate(category_ids)}

    def sample(result, i):
        flip = train and np.random.default_rng(int(batch["seed"][i])).random() < 0.5
        targets = coco_targets(
            json.loads(batch["annotation"][i] or "[]"), *result.image.size, img_size, index, flip=flip, train=train
        )
        return {"image": letterbox(result.image, img_size, flip), **{k: targets[k] for k in ("boxes", "labels", "masks")}}

    for out in _decode_rows(batch, counter, sample, img_size):
        yield {
            "image": np.stack(out["image"]),
            **{k: _ragged(out[k]) for k in ("boxes", "labels", "masks")},
            "image_id": np.array(out["image_id"]),
        }


def decode_segmentation(
    batch: dict, *, img_size: int, train: bool, scale_range: tuple[float, float], counter: Counter = None
) -> Iterator[dict]:
    def sample(result, i):
        src = batch["annotation_bytes"][i] if "annotation_bytes" in batch else batch["annotation"][i]
        labels = decode_label_map(src, expected_size=result.image.size)
        if isinstance(labels, str):
            return labels
        rng = np.random.default_rng(int(batch["seed"][i])) if train else None
        image, label = segmentation_sample(result.image, labels, img_size, rng, scale_range)
        return {"image": image, "label": label}

    for out in _decode_rows(batch, counter, sample, img_size):
        yield {"image": np.stack(out["image"]), "label": np.stack(out["label"]), "image_id": np.array(out["image_id"])}


# --------------------------------------------------------------------------- builders


def pretrain_dataset(
    source: "str | Path | DataSource",
    *,
    split: str = "train",
    img_size: int = 224,
    mask_ratio: float = 0.5,
    seed: int = 0,
    epoch: int = 0,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    hflip: float = 0.5,
    draft: bool = True,
    counter: Counter = None,
) -> "ray.data.Dataset":
    """MixMAE pretraining pairs: one row per pair with ``images`` (uint8 ``(2, 3, S, S)``,
    the two views, each RandomResizedCrop(scale, bicubic) + flip), ``mask`` (bool
    ``(S/32, S/32)``, ``floor(L * mask_ratio)`` ones, ``sample_mask`` seeded per pair),
    ``image_ids`` ``(2,)`` and ``epoch``. Images are paired at random across the
    whole split, afresh every epoch; with an odd count one image sits the epoch out.
    Iterate with ``collate_fn=pipelines.data.collate.PairCollate()``.
    """
    return _pipeline(
        open_source(source), split, ["image_id", "path"], decode_pairs,
        group=2, shuffle=True, seed=seed, epoch=epoch, max_packed_units=64, img_size=img_size,
        mask_ratio=mask_ratio, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, draft=draft, counter=counter,
    )


def classification_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 224,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    auto_augment: Optional[str] = RAND_AUGMENT,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    counter: Counter = None,
) -> "ray.data.Dataset":
    """Rows ``{"image": uint8 (3, S, S), "label": int64, "image_id": int64}``.

    ``train``: timm RandomResizedCrop(scale) + flip + RandAugment(``auto_augment``), order
    and augmentation drawn from ``(seed, epoch)``; random erasing and mixup/cutmix belong
    on the device. Eval: resize to ``img_size / crop_pct`` + center crop, manifest order.
    """
    return _pipeline(
        open_source(source), split, ["image_id", "path", "label"], decode_classification,
        group=1, shuffle=train, seed=seed, epoch=epoch, max_packed_units=64, img_size=img_size,
        train=train, transform=(auto_augment, crop_pct, interpolation, tuple(scale), hflip), counter=counter,
    )


def detection_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 512,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    counter: Counter = None,
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
        group=1, shuffle=train, seed=seed, epoch=epoch, max_packed_units=16, img_size=img_size,
        train=train, category_ids=source.category_ids, counter=counter,
    )


def segmentation_dataset(
    source: "str | Path | DataSource",
    *,
    split: str,
    img_size: int = 512,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    scale_range: tuple[float, float] = (0.5, 2.0),
    counter: Counter = None,
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
        group=1, shuffle=train, seed=seed, epoch=epoch, max_packed_units=32, img_size=img_size,
        train=train, scale_range=tuple(scale_range), counter=counter,
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
