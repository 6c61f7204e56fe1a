"""The shared decode path, the per-image transforms and the skip accounting (no Ray)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.data.collate import normalize_on_device
from pipelines.data.order import units_per_task
from pipelines.data.decode import decode_image, decode_label_map
from pipelines.data.quality import PARTNER_SKIPPED, DataQualityError, Tally, check_skip_threshold
from pipelines.data.transforms import (
    IGNORE_INDEX,
    coco_targets,
    random_resized_crop,
    reduce_zero_label,
    sample_resized_crop,
    segmentation_sample,
)


@pytest.mark.parametrize(
    "name",
    [
        "truncated.jpg", "empty.jpg", "missing.jpg", "text.jpg", "tiny.png", "bomb.png", "png_named.jpg",
        "cmyk.jpg", "gray.jpg", "palette.png", "rgba.png", "deep16.png", "rotated.jpg",
    ],
)
def test_each_kind_of_bad_input_is_converted_or_skipped_with_its_reason(bad_images, name):
    path, status, reason = bad_images[name]
    result = decode_image(path)
    assert (result.status, result.reason) == (status, reason)
    if status == "skipped":
        assert result.image is None
    else:
        assert result.image.mode == "RGB" and result.image.size == result.size


def test_exif_rotation_is_applied(bad_images):
    stored = Image.open(bad_images["rotated.jpg"][0])
    assert stored.size == (64, 48)
    assert decode_image(bad_images["rotated.jpg"][0]).image.size == (48, 64)


def test_16_bit_values_are_rescaled_not_clipped(bad_images):
    pixels = np.asarray(decode_image(bad_images["deep16.png"][0]).image)
    assert np.all(np.abs(pixels.astype(int) - round(40000 * 255 / 65535)) <= 1)


def test_bytes_and_paths_decode_alike(bad_images):
    path = bad_images["cmyk.jpg"][0]
    from_bytes = decode_image(path.read_bytes())
    assert from_bytes.status == "converted"
    assert np.array_equal(np.asarray(from_bytes.image), np.asarray(decode_image(path).image))
    assert decode_image(b"").reason == "empty"
    assert decode_image(None).reason == "missing"


def test_pixel_cap_and_pil_bomb_warning_both_skip(tmp_path, bad_images):
    assert decode_image(bad_images["png_named.jpg"][0], max_pixels=100).reason == "too_large"
    from tests.conftest import _png_header_only

    # 1e8 pixels: between PIL's warning and error limits, so only its warning fires
    _png_header_only(tmp_path / "warn.png", 10000, 10000)
    assert decode_image(tmp_path / "warn.png", max_pixels=10**10).reason == "too_large"


def _photo(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 50)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_decoding_gives_the_same_size_and_nearly_the_same_pixels(orientation):
    data = _photo(500, 375)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, "JPEG", quality=90, exif=exif)
        data = buf.getvalue()
    reductions, diffs = [], []
    for seed in range(24):
        fast, fast_view = random_resized_crop(data, np.random.default_rng(seed), 64, draft=True)
        full, full_view = random_resized_crop(data, np.random.default_rng(seed), 64, draft=False)
        assert fast_view.shape == full_view.shape == (3, 64, 64) and full.reduction == 1
        reductions.append(fast.reduction)
        diffs.append(np.abs(fast_view.astype(int) - full_view.astype(int)).mean())
    assert max(reductions) >= 2, "a 64 px crop of a 500x375 JPEG should decode reduced"
    assert max(diffs) < 3.0, diffs


def test_draft_never_reduces_below_the_crop_resolution():
    data = _photo(500, 375)
    for seed in range(24):
        result, _ = random_resized_crop(data, np.random.default_rng(seed), 224, draft=True)
        # at 224 even the whole image halved (250x188) would be enlarged, so nothing may be dropped
        assert result.reduction == 1


def test_resized_crop_boxes_follow_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = sample_resized_crop(500, 375, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.2 * 500 * 375 * 0.97 <= w * h <= 500 * 375
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    a = sample_resized_crop(500, 375, np.random.default_rng(3))
    assert a == sample_resized_crop(500, 375, np.random.default_rng(3))


def test_normalize_on_device_matches_float_normalisation():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize_on_device(images)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(normalize_on_device(images, (0.5,) * 3, (0.5,) * 3), images.float() / 127.5 - 1, atol=1e-5)


def test_dataset_planning_modules_do_not_import_torch():
    """Ray Train's dataset manager and split coordinators unpickle the datasets' operators,
    importing these modules; torch would cost each of those processes seconds."""
    code = (
        "import sys, pipelines.data.datasets, pipelines.data.quality, pipelines.data.manifest\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_train_loop_config_unpickles_without_torch_or_mlflow(synthetic_data, tmp_path):
    """Ray Train's controller unpickles every run's train-loop config: the stages' jobs with
    their data recipes, a pretraining recipe holding the method's MaskSpec; torch, timm or
    MLflow would cost it seconds. The workers get the jobs back whole."""
    from ray import cloudpickle

    from mixmae_core.masking import MaskSpec
    from pipelines.config import load_config
    from pipelines.data.manifest import build_manifest, open_source, write_manifest
    from pipelines.stages import entry
    from pipelines.stages.jobs import DataRecipe, StageJob

    config = load_config()
    source = open_source(write_manifest(build_manifest("imagefolder", synthetic_data["pretrain"]), tmp_path / "m.parquet"))
    masks = MaskSpec((2, 2), 0.5, "shared")
    job = StageJob("pretrain", config.pretrain, config.pretrain.model,
                   data={"train": DataRecipe("pretrain", source, {"img_size": 64, "masks": masks})})
    packed = entry.train_loop_config([job])
    code = (
        "import pickle, sys\n"
        "config = pickle.loads(sys.stdin.buffer.read())\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'timm', 'rich', 'mixmae_core'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(packed), check=True)
    (unpacked,) = entry.unpack_jobs(packed)
    assert unpacked.name == "pretrain" and unpacked.data["train"].arguments["masks"] == masks


def test_decode_tasks_are_neither_too_small_nor_too_large():
    assert units_per_task(100, 1, cpus=4, max_units=64) == 32  # small split: 32 images a task, not 7
    assert units_per_task(40, 2, cpus=4, max_units=64) == 16  # pairs: still 32 images
    assert units_per_task(300, 2, cpus=2, max_units=256) == 150  # one task per CPU
    assert units_per_task(1200, 2, cpus=2, max_units=256) == 200  # three equal waves, not 256+256+88
    assert units_per_task(100_000, 1, cpus=8, max_units=64) == 64  # capped task size
    assert units_per_task(100, 1, cpus=4, max_units=16) == 16


def test_reduce_zero_label():
    labels = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    assert reduce_zero_label(labels).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_segmentation_training_sample_keeps_labels_aligned_with_pixels():
    img = np.zeros((60, 90, 3), np.uint8)
    img[:, 45:] = 200  # right half bright, labelled class 2 (-> 1)
    labels = np.ones((60, 90), np.uint8)
    labels[:, 45:] = 2
    for seed in range(10):
        image, label = segmentation_sample(Image.fromarray(img), labels, 64, np.random.default_rng(seed))
        assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == np.uint8
        bright = image[0] > 150
        assert np.all(label[bright & (label != IGNORE_INDEX)] == 1)
        assert set(np.unique(label)) <= {0, 1, IGNORE_INDEX}
    image, label = segmentation_sample(Image.fromarray(img), labels, 64)
    assert image.shape == (3, 64, 64) and set(np.unique(label)) == {0, 1}


def test_label_map_problems_are_reasons(tmp_path, bad_images):
    Image.fromarray(np.ones((48, 64), np.uint8)).save(tmp_path / "ok.png")
    assert decode_label_map(tmp_path / "ok.png", expected_size=(64, 48)).shape == (48, 64)
    assert decode_label_map(tmp_path / "ok.png", expected_size=(10, 10)) == "label_size_mismatch"
    assert decode_label_map(tmp_path / "nope.png") == "label_missing"
    assert decode_label_map(bad_images["text.jpg"][0]) == "label_unreadable"


def test_coco_targets_scale_and_flip_boxes_with_their_masks():
    mask = np.zeros((100, 200), np.uint8)
    mask[10:30, 20:60] = 1
    ann = {"bbox": [20, 10, 40, 20], "category_id": 7, "iscrowd": 0, "segmentation": [[20, 10, 60, 10, 60, 30, 20, 30]]}
    crowd = dict(ann, iscrowd=1)
    for flip in (False, True):
        t = coco_targets([ann, crowd], 200, 100, 64, {7: 1}, flip=flip)
        assert t["boxes"].shape == (1, 4) and t["labels"].tolist() == [1] and t["masks"].shape == (1, 64, 64)
        x0, y0, x1, y1 = t["boxes"][0]
        expected = [6.4, 3.2, 19.2, 9.6] if not flip else [64 - 19.2, 3.2, 64 - 6.4, 9.6]
        assert np.allclose([x0, y0, x1, y1], expected, atol=0.01)
        ys, xs = np.nonzero(t["masks"][0])
        assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
    assert len(coco_targets([ann, crowd], 200, 100, 64, {7: 1}, train=False)["labels"]) == 2


def _tally(ok: int, bad: dict[str, int], partner: int = 0) -> dict:
    tally = Tally()
    for i in range(ok):
        tally.count(f"/d/ok{i}.jpg", "ok")
    for reason, n in bad.items():
        for i in range(n):
            tally.count(f"/d/{reason}{i}.jpg", "skipped", reason)
    for i in range(partner):
        tally.skip(f"/d/partner{i}.jpg", PARTNER_SKIPPED)
    return tally.as_dict()


def test_skip_threshold_fires_above_the_fraction_and_names_examples():
    with pytest.raises(DataQualityError, match=r"3 of 200 images \(1.5%\).*truncated: 2 \(e.g. /d/truncated0.jpg"):
        check_skip_threshold(_tally(197, {"truncated": 2, "missing": 1}))
    check_skip_threshold(_tally(199, {"truncated": 1}))  # 0.5%
    check_skip_threshold(_tally(5, {"truncated": 5}))  # too few attempted to judge
    check_skip_threshold(_tally(150, {}, partner=50))  # dropped partners are not errors
    with pytest.raises(DataQualityError):
        check_skip_threshold(_tally(90, {"corrupt": 10}), max_skip_fraction=0.05, min_attempted=10)


def test_tally_merges_and_partitions_attempts():
    total = Tally()
    total.merge(_tally(3, {"empty": 2}))
    total.merge(_tally(1, {"empty": 1}, partner=1))
    snap = total.as_dict()
    assert snap["attempted"] == 8 and snap["ok"] == 4
    assert snap["skipped"] == {"empty": 3, PARTNER_SKIPPED: 1}
    assert snap["ok"] + snap["converted"] + sum(snap["skipped"].values()) == snap["attempted"]
