"""Ray Data pipelines on the session's local Ray cluster: pairing, epochs, determinism,
workers' shards and resume positions, packed shards, every task's rows, skip accounting."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch

from mixmae_core.masking import MaskSpec
from pipelines.data.collate import DetectionCollate, PairCollate
from pipelines.data.datasets import (
    build_dataset,
    classification_dataset,
    coco_ground_truth,
    detection_dataset,
    pretrain_dataset,
    segmentation_dataset,
)
from pipelines.data.manifest import build_manifest, open_source, pack_manifest, write_manifest
from pipelines.data.quality import PARTNER_SKIPPED, DataQualityError, StageSkips, check_skip_threshold, start_skip_counter
from pipelines.data.order import Shard, chunk_units
from pipelines.data.samples import STREAM_BLOCK_BYTES, decode_classification, decode_pairs
from pipelines.data.synth import SCALES, SYNTH_LAYOUTS

TINY = SCALES["tiny"]
MIXMAE_075 = MaskSpec((3, 3), 0.75, "shared")
PRETRAIN_TRAIN = TINY.classes["pretrain"] * TINY.train_per_class


@pytest.fixture(scope="module")
def manifests(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifests")
    return {
        name: write_manifest(build_manifest(SYNTH_LAYOUTS[name], root), out / f"{name}.parquet")
        for name, root in synthetic_data.items()
    }


def _pairs(batches) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """``{(id_a, id_b): (images (2, 3, S, S), masks (2, h, w))}`` from PairCollate batches."""
    out = {}
    for batch in batches:
        assert batch["images"].dtype == torch.uint8 and batch["masks"].dtype == torch.bool
        assert len(batch["images"]) == len(batch["image_ids"]) == len(batch["masks"]) == 2 * len(batch["position"])
        for k in range(len(batch["position"])):
            key = tuple(batch["image_ids"][2 * k : 2 * k + 2].tolist())
            out[key] = (batch["images"][2 * k : 2 * k + 2].numpy(), batch["masks"][2 * k : 2 * k + 2].numpy())
    return out


def _epoch(ds, batch_size: int = 8):
    return _pairs(ds.iter_torch_batches(batch_size=batch_size, collate_fn=PairCollate()))


def _train_ids(manifest) -> list[int]:
    table = pq.read_table(manifest, filters=pc.field("split") == "train")
    return sorted(table.column("image_id").to_pylist())


def _epoch_dataset(manifest, epoch: int, **kwargs):
    return build_dataset("pretrain", manifest, img_size=96, masks=MIXMAE_075, seed=0, shard=Shard(epoch=epoch), **kwargs)


def test_pairs_cover_each_image_once_and_change_every_epoch(ray_local, manifests):
    epochs = [_epoch(_epoch_dataset(manifests["pretrain"], e)) for e in (0, 1)]
    for pairs in epochs:
        ids = [i for key in pairs for i in key]
        assert sorted(ids) == _train_ids(manifests["pretrain"]) and len(ids) == PRETRAIN_TRAIN
        for images, masks in pairs.values():
            assert images.shape == (2, 3, 96, 96)
            assert masks.shape == (2, 3, 3) and masks[0].sum() == int(9 * 0.75) and (masks[0] == masks[1]).all()
    assert set(epochs[0]) != set(epochs[1])
    masks = {m.tobytes() for _, m in epochs[0].values()}
    assert len(masks) > 1, "one mask per pair, not one per batch"

    # (seed, epoch) alone fix pairs, crops, masks and their order: the same epoch again is the same
    replay = list(_epoch_dataset(manifests["pretrain"], 1).iter_torch_batches(batch_size=8, collate_fn=PairCollate()))
    assert list(_pairs(replay)) == list(epochs[1])
    for key, (images, mask) in _pairs(replay).items():
        assert np.array_equal(images, epochs[1][key][0]) and np.array_equal(mask, epochs[1][key][1])
    other_seed = _epoch(pretrain_dataset(manifests["pretrain"], img_size=96, masks=MIXMAE_075, seed=1, shard=Shard(epoch=1)))
    assert other_seed.keys() != epochs[1].keys()


def _ids_and_positions(ds, batch_size: int = 4) -> tuple[list[int], list[int]]:
    batches = list(ds.iter_torch_batches(batch_size=batch_size, collate_fn=PairCollate()))
    return [i for b in batches for i in b["image_ids"].tolist()], [p for b in batches for p in b["position"].tolist()]


def test_workers_shards_are_disjoint_ordered_and_a_resumed_shard_reads_on(ray_local, manifests):
    """Each worker's shard of an epoch is its blocks of the epoch's order, in order; the
    workers' shards cover the epoch; one started at a position reads exactly what follows."""
    manifest = manifests["pretrain"]
    def shard(**fields):
        return _ids_and_positions(build_dataset("pretrain", manifest, img_size=64, seed=0, shard=Shard(epoch=3, **fields)))

    whole, _ = shard()
    shards = [shard(rank=r, world=2, block=4) for r in (0, 1)]
    for rank, (ids, positions) in enumerate(shards):
        assert positions == list(range(len(positions))) and len(ids) == 2 * len(positions)
        # blocks of 4 pairs (8 images) dealt in turn: rank r's k-th block is block 2k + r of the epoch
        for k in range(len(ids) // 8):
            assert ids[8 * k : 8 * k + 8] == whole[8 * (2 * k + rank) : 8 * (2 * k + rank) + 8]
    assert sorted(shards[0][0] + shards[1][0]) == sorted(whole) == _train_ids(manifest)
    ids, positions = shard(rank=1, world=2, block=4, start=6, limit=14)
    assert positions == list(range(6, 14)) and ids == shards[1][0][12:28]
    assert shard(rank=1, world=2, block=4, start=14, limit=14) == ([], [])


def test_odd_image_count_leaves_one_image_out(ray_local, manifests, tmp_path):
    table = pq.read_table(manifests["pretrain"], filters=pc.field("split") == "train").slice(0, 79)
    pq.write_table(table, tmp_path / "odd.parquet")
    rows = pretrain_dataset(tmp_path / "odd.parquet", img_size=64).take_all()
    ids = [i for r in rows for i in r["image_ids"]]
    assert len(rows) == 39 and len(set(ids)) == 78


def test_decode_tasks_yield_blocks_bounded_in_bytes_at_every_image_size(manifests):
    """A block holds at most STREAM_BLOCK_BYTES of images (64 at 224 px, 16 at 448), so
    the blocks a decode task keeps waiting stay bounded in bytes at every image size."""
    table = open_source(manifests["pretrain"]).table("train", ["image_id", "path", "label"])
    pairs = chunk_units(table, Shard(), 0, chunk=24, group=2, shuffle=True, seed=0)
    singles = chunk_units(table, Shard(), 0, chunk=80, group=1, shuffle=False, seed=0)
    expected = {224: ([48], [64, 16]), 448: ([16, 16, 16], [16] * 5)}
    for size, (pair_images, single_images) in expected.items():
        blocks = list(decode_pairs(pairs, img_size=size, masks=MaskSpec((size // 32,) * 2, 0.5, "shared")))
        assert [b["images"].shape[0] * 2 for b in blocks] == pair_images
        assert all(b["images"].nbytes <= STREAM_BLOCK_BYTES for b in blocks)
        blocks = list(decode_classification(singles, img_size=size, train=False, transform=()))
        assert [len(b["image"]) for b in blocks] == single_images
        assert all(b["image"].nbytes <= STREAM_BLOCK_BYTES for b in blocks)


def test_packed_shards_give_one_worker_the_same_pairs_and_images(ray_local, manifests, tmp_path):
    packed = tmp_path / "packed"
    pack_manifest(manifests["pretrain"], packed, rows_per_shard=30)
    from_paths = _epoch(pretrain_dataset(manifests["pretrain"], img_size=64, seed=3, shard=Shard(epoch=2)))
    from_bytes = _epoch(pretrain_dataset(packed, img_size=64, seed=3, shard=Shard(epoch=2)))
    assert list(from_paths) == list(from_bytes) and len(from_paths) == PRETRAIN_TRAIN // 2
    for key, (images, mask) in from_paths.items():
        assert np.array_equal(images, from_bytes[key][0]) and np.array_equal(mask, from_bytes[key][1])
    # two workers read their own row groups: disjoint, covering, in order; resumed, what follows
    shards = [_ids_and_positions(pretrain_dataset(packed, img_size=64, seed=3, shard=Shard(rank=r, world=2, epoch=2)))
              for r in (0, 1)]
    assert sorted(shards[0][0] + shards[1][0]) == _train_ids(manifests["pretrain"])
    assert all(positions == list(range(len(positions))) for _, positions in shards)
    again = _ids_and_positions(pretrain_dataset(packed, img_size=64, seed=3, shard=Shard(rank=1, world=2, epoch=2, start=5)))
    assert again == (shards[1][0][10:], shards[1][1][5:])

    def by_id(source):
        ds = classification_dataset(source, split="val", img_size=64, train=False)
        return {r["image_id"]: r["image"] for r in ds.take_all()}

    a, b = by_id(manifests["pretrain"]), by_id(packed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["imagenet", "inat2018", "inat2019", "places205", "places365"])
def test_classification_eval_reads_every_layout(ray_local, manifests, name):
    rows = classification_dataset(manifests[name], split="val", img_size=64, train=False).take_all()
    assert len(rows) == TINY.classes[name] * TINY.val_per_class
    assert {r["label"] for r in rows} == set(range(TINY.classes[name]))
    assert all(r["image"].shape == (3, 64, 64) and r["image"].dtype == np.uint8 for r in rows)


def test_classification_training_rows_are_augmented_per_epoch_and_reproducible(ray_local, manifests):
    def epoch(e):
        return classification_dataset(manifests["imagenet"], split="train", img_size=64, train=True, seed=5, shard=Shard(epoch=e))

    ds = epoch(0)
    first = {r["image_id"]: r["image"] for r in ds.take_all()}
    second = {r["image_id"]: r["image"] for r in epoch(1).take_all()}
    assert first.keys() == second.keys() and len(first) == TINY.classes["imagenet"] * TINY.train_per_class
    assert sum(np.array_equal(first[k], second[k]) for k in first) < len(first) // 10
    replay = epoch(1).take_all()
    assert [r["image_id"] for r in replay] == list(second)
    assert all(np.array_equal(r["image"], second[r["image_id"]]) for r in replay)
    # a worker whose share is a quarter of a CPU, with every other CPU taken: its tasks ask for
    # that quarter, so they run, and decode the same rows in the same order
    # every CPU free now but a quarter: with two test clusters on one machine, Ray Train's
    # placement-group cleaner cannot tell which is its own, so the group of a controller killed
    # earlier in this session (with a Tune trial ASHA stopped, most likely) keeps its CPUs until
    # the session ends
    held = ray.util.placement_group([{"CPU": ray.available_resources().get("CPU", 0) - 0.25}])
    ray.get(held.ready(), timeout=60)
    rows: list = []
    try:
        reader = threading.Thread(target=lambda: rows.extend(classification_dataset(
            manifests["imagenet"], split="train", img_size=64, train=True, seed=5, shard=Shard(epoch=1), cpus=0.25,
        ).take_all()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert not reader.is_alive(), "the decode tasks waited for a whole CPU"
    finally:
        ray.util.remove_placement_group(held)
    assert [r["image_id"] for r in rows] == list(second)
    assert all(np.array_equal(r["image"], second[r["image_id"]]) for r in rows)
    batch = next(iter(ds.iter_torch_batches(batch_size=16)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (16, 3, 64, 64)
    assert batch["label"].dtype == torch.int64


def test_detection_targets_live_in_the_ground_truth_frame(ray_local, manifests):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = detection_dataset(manifests["coco"], split="val", img_size=96, train=False)
    detections = []
    for batch in ds.iter_torch_batches(batch_size=4, collate_fn=DetectionCollate()):
        assert batch["image_id"].tolist() == [int(t["image_id"]) for t in batch["targets"]]
        for image, target in zip(batch["images"], batch["targets"]):
            assert image.shape == (3, 96, 96) and image.dtype == torch.uint8
            assert target["masks"].shape == (len(target["boxes"]), 96, 96)
            assert set(target["labels"].tolist()) <= {1, 2, 3}
            for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"].numpy()):
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode()
                detections.append(
                    {
                        "image_id": int(target["image_id"]), "category_id": label, "score": 1.0,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "segmentation": rle,
                    }
                )
    gt = COCO()
    gt.dataset = coco_ground_truth(manifests["coco"], split="val", img_size=96)
    gt.createIndex()
    assert len(gt.getImgIds()) == TINY.dense_val
    for kind in ("bbox", "segm"):
        evaluation = COCOeval(gt, gt.loadRes(detections), kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] > 0.99, f"pipeline targets scored as predictions should be perfect ({kind})"


def test_detection_training_flips_some_images(ray_local, manifests):
    plain = {r["image_id"]: r for r in detection_dataset(manifests["coco"], split="train", img_size=128, train=False).take_all()}
    rows = detection_dataset(manifests["coco"], split="train", img_size=128, train=True).take_all()
    flipped = 0
    for r in rows:
        ref = plain[r["image_id"]]
        assert np.all((r["boxes"] >= 0) & (r["boxes"] <= 128))
        if not np.allclose(r["boxes"], ref["boxes"]):
            assert np.allclose(r["boxes"][:, [2, 0]], 128 - ref["boxes"][:, [0, 2]], atol=1e-3)
            assert np.array_equal(r["image"], ref["image"][:, :, ::-1])
            flipped += 1
    assert 0 < flipped < len(rows)


def test_segmentation_labels_reduce_zero_and_keep_background(ray_local, manifests):
    rows = segmentation_dataset(manifests["ade20k"], split="val", img_size=64, train=False).take_all()
    assert len(rows) == TINY.dense_val
    labels = np.stack([r["label"] for r in rows])
    assert labels.shape == (TINY.dense_val, 64, 64) and labels.dtype == np.uint8
    values, counts = np.unique(labels, return_counts=True)
    assert set(values) == {0, 1, 2, 3, 255}
    assert counts[0] == counts.max(), "background (class 1 -> 0) dominates"
    train = segmentation_dataset(manifests["ade20k"], split="train", img_size=64, train=True).take(4)
    assert all(r["image"].shape == (3, 64, 64) and r["label"].shape == (64, 64) for r in train)


def _snapshot(counter, attempted: int, timeout_s: float = 30.0) -> dict:
    """Counts arrive fire-and-forget: poll until they are all in (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = counter.snapshot()
        if snap["attempted"] >= attempted or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def test_bad_inputs_are_counted_and_the_threshold_fires(ray_local, bad_dataset, bad_images, tmp_path):
    manifest = write_manifest(build_manifest("places", bad_dataset, "train"), tmp_path / "bad.parquet")
    name = f"skips-{uuid.uuid4().hex}"
    actor = start_skip_counter(name)
    counter = StageSkips(name, "classify")
    rows = classification_dataset(manifest, split="train", img_size=32, train=False, skips=counter).take_all()
    snap = _snapshot(counter, len(bad_images) + 1)
    expected_skips = {r: 1 for _, s, r in bad_images.values() if s == "skipped"}
    assert snap["skipped"] == expected_skips
    assert snap["converted"] == sum(s == "converted" for _, s, _ in bad_images.values())
    assert snap["ok"] == 2 and len(rows) == snap["ok"] + snap["converted"]
    assert snap["examples"]["truncated"][0].endswith("truncated.jpg")
    with pytest.raises(DataQualityError, match="truncated.jpg"):
        check_skip_threshold(snap, min_attempted=10)

    counter = StageSkips(name, "pretrain")  # the same actor, a tally of its own
    pairs = pretrain_dataset(manifest, img_size=64, skips=counter).take_all()
    snap = _snapshot(counter, len(bad_images) + 1)
    dropped = snap["skipped"].pop(PARTNER_SKIPPED, 0)
    assert snap["skipped"] == expected_skips and dropped >= 1
    assert 2 * len(pairs) + dropped + len(expected_skips) == len(bad_images) + 1
    assert snap["attempted"] == len(bad_images) + 1
    ray.kill(actor)
