"""Transfer-stage metrics (COCO, semantic segmentation, top-k) and prediction pictures."""

import copy

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from mixmae_core.tasks.metrics import classification_metrics, coco_evaluate, segmentation_metrics
from mixmae_core.tasks.pictures import draw_detections, draw_segmentation, palette

H, W = 64, 80
LABEL_TO_CATEGORY = {1: 7, 2: 11}  # contiguous model labels -> sparse COCO ids


def _coco_fixture():
    """Two images, three objects with RLE masks, and the predictions that reproduce them."""
    objects = [  # image id, category, x0, y0, x1, y1
        (1, 7, 5, 8, 30, 40),
        (1, 11, 40, 10, 70, 50),
        (2, 7, 10, 12, 50, 60),
    ]
    annotations, predictions = [], {1: [], 2: []}
    for ann_id, (image_id, category, x0, y0, x1, y1) in enumerate(objects, start=1):
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        annotations.append(
            dict(
                id=ann_id,
                image_id=image_id,
                category_id=category,
                bbox=[x0, y0, x1 - x0, y1 - y0],
                area=float(mask.sum()),
                iscrowd=0,
                segmentation={"size": rle["size"], "counts": rle["counts"].decode()},
            )
        )
        label = {v: k for k, v in LABEL_TO_CATEGORY.items()}[category]
        predictions[image_id].append(([x0, y0, x1, y1], label, torch.from_numpy(mask).float()))
    gt = dict(
        images=[dict(id=i, height=H, width=W) for i in (1, 2)],
        annotations=annotations,
        categories=[dict(id=7, name="cat"), dict(id=11, name="dog")],
    )
    preds = [
        dict(
            image_id=image_id,
            boxes=torch.tensor([b for b, _, _ in objs], dtype=torch.float),
            labels=torch.tensor([lab for _, lab, _ in objs]),
            scores=torch.linspace(0.9, 0.8, len(objs)),
            masks=torch.stack([m for _, _, m in objs])[:, None],  # torchvision's (n, 1, H, W)
        )
        for image_id, objs in predictions.items()
    ]
    return gt, preds


def test_coco_evaluate_perfect_predictions_score_one():
    gt, preds = _coco_fixture()
    original = copy.deepcopy(gt)
    result = coco_evaluate(gt, preds, LABEL_TO_CATEGORY)
    assert result == pytest.approx({f"{t}_{k}": 1.0 for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")})
    assert gt == original  # COCOeval annotates the ground truth it is given: not the caller's


def test_coco_evaluate_counts_misses_and_wrong_classes():
    gt, preds = _coco_fixture()
    preds[1]["labels"] = torch.tensor([2])  # the object of image 2 is called a dog
    result = coco_evaluate(gt, preds, LABEL_TO_CATEGORY)
    assert 0.0 < result["bbox_AP"] < 1.0 and 0.0 < result["segm_AP"] < 1.0


def test_coco_evaluate_without_predictions_scores_zero():
    gt, preds = _coco_fixture()
    empty = [dict(image_id=p["image_id"], boxes=torch.zeros(0, 4), labels=torch.zeros(0), scores=torch.zeros(0),
                  masks=torch.zeros(0, 1, H, W)) for p in preds]
    for predictions in ([], empty):
        result = coco_evaluate(gt, predictions, LABEL_TO_CATEGORY)
        assert set(result) == {f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")}
        assert all(v == 0.0 for v in result.values())


def test_segmentation_metrics_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 3]])
    # counted pixels (6): class 0: tp 2, union 3 (one 0 called 1); class 1: tp 2, union 4 (the 2 and
    # the first-row 0 called 1); class 2: tp 0, union 1; class 3: predicted only on an ignored pixel.
    metric = segmentation_metrics(num_classes=5)
    metric.update(pred[None], target[None])
    result = metric.compute()
    assert result["mIoU"].item() == pytest.approx((2 / 3 + 2 / 4 + 0) / 3)
    assert result["pixel_acc"].item() == pytest.approx(4 / 6)

    logits = torch.nn.functional.one_hot(pred, 5).permute(2, 0, 1).float()[None]
    again = segmentation_metrics(num_classes=5)
    again.update(logits[:, :, :1], target[None, :1])  # two batches, logits instead of labels
    again.update(logits[:, :, 1:], target[None, 1:])
    assert again.compute()["mIoU"].item() == pytest.approx(result["mIoU"].item())


def test_classification_metrics_by_hand():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 0, 9, 0, 0, 0]])
    labels = torch.tensor([5, 5, 2])  # right, 6th choice, right
    metric = classification_metrics(num_classes=6)
    metric.update(logits, labels)
    result = metric.compute()
    assert result["top1"].item() == pytest.approx(2 / 3)
    assert result["top5"].item() == pytest.approx(2 / 3)
    metric.update(logits[1:2], torch.tensor([1]))  # 2nd choice
    assert metric.compute()["top5"].item() == pytest.approx(3 / 4)


def test_draw_detections_paints_kept_objects_only():
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    masks = torch.zeros(2, 1, H, W)
    masks[0, :, 10:20, 10:20] = 0.9
    masks[1, :, 40:60, 50:70] = 0.9
    picture = draw_detections(
        image,
        boxes=torch.tensor([[10.0, 10, 20, 20], [50, 40, 70, 60]]),
        labels=torch.tensor([1, 2]),
        masks=masks,
        scores=torch.tensor([0.9, 0.1]),
        class_names=["bg", "cat", "dog"],
    )
    assert picture.size == (W, H)
    pixels = np.asarray(picture)
    assert pixels[15, 15].any()  # inside the kept mask
    assert not pixels[50, 60].any()  # the low-score object is not drawn


def test_draw_segmentation_side_by_side():
    image = torch.full((3, H, W), 128, dtype=torch.uint8)
    pred = torch.zeros(H, W, dtype=torch.long)
    pred[:, W // 2 :] = 3
    target = torch.full((H, W), 255)
    picture = draw_segmentation(image, pred, target, num_classes=4)
    assert picture.size == (3 * W, H)
    pixels = torch.from_numpy(np.asarray(picture).copy())
    colours = palette(4)
    assert torch.equal(pixels[0, W], colours[0]) and torch.equal(pixels[0, W + W // 2], colours[3])
    assert not pixels[:, 2 * W :].any()  # all ignored: black
    assert draw_segmentation(image, pred, num_classes=4).size == (2 * W, H)


def test_weighted_knn_votes_as_written_out():
    """DINO's weighted k-NN: the k most similar memories vote exp(similarity / T) for their class."""
    import torch.nn.functional as F

    from mixmae_core.tasks.knn import knn_predict

    generator = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (50,), generator=generator)
    queries = F.normalize(torch.randn(7, 8, generator=generator), dim=1)
    scores = knn_predict(memory, labels, queries, 3, k=5, temperature=0.07, chunk=3)
    for q, row in zip(queries, scores):
        similarity = memory @ q
        top = similarity.argsort(descending=True)[:5]
        expected = torch.zeros(3)
        for i in top:
            expected[labels[i]] += torch.exp(similarity[i] / 0.07)
        assert torch.allclose(row, expected, rtol=1e-5)
    assert knn_predict(memory[:2], labels[:2], queries, 3, k=20).shape == (7, 3)  # fewer memories than k: all vote
