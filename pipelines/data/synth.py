"""Small synthetic stand-ins for every dataset, written in the real on-disk layouts so the
real readers are what the embedded pipeline exercises.

Images carry learnable structure: a classification image's class fixes its shape and
colour ("object" sets) or its stripe texture ("scene" sets, Places-like); COCO-like and
ADE-like targets are exactly the drawn objects. Output is a function of (scale, seed).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SYNTH_LAYOUTS = {
    "pretrain": "imagefolder",
    "imagenet": "imagefolder",
    "inat2018": "inat",
    "inat2019": "inat",
    "places205": "places",
    "places365": "places",
    "coco": "coco",
    "ade20k": "ade20k",
}
_MARKER = ".mixmae_synth.json"
_VERSION = 2


@dataclass(frozen=True)
class _Scale:
    classes: dict[str, int]
    train_per_class: int
    val_per_class: int
    dense_train: int  # COCO-like / ADE-like images
    dense_val: int


SCALES = {
    "tiny": _Scale(
        {"pretrain": 4, "imagenet": 6, "inat2018": 5, "inat2019": 4, "places205": 4, "places365": 5}, 20, 6, 48, 16
    ),
    # 60 validation images a class: a probe's top-1 on 480 images is known to +-4.5% (95%)
    "small": _Scale(
        {"pretrain": 6, "imagenet": 10, "inat2018": 8, "inat2019": 6, "places205": 6, "places365": 8}, 80, 60, 160, 40
    ),
}
CLASSIFICATION_SIZE = (64, 112)  # sides drawn per image, so crops and aspect ratios vary
DENSE_SIZE = 128
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ((220, 50, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (170, 60, 200))
COCO_CATEGORIES = {1: "circle", 3: "square", 7: "triangle"}  # non-contiguous ids, like COCO's
ADE_BACKGROUND, ADE_OBJECTS = 1, {2: "circle", 3: "square", 4: "triangle"}


def write_synthetic(out: Path, scale: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write every synthetic dataset under ``out`` and return ``{name: root}`` for the layout
    readers (layouts in :data:`SYNTH_LAYOUTS`). A folder already holding the same
    scale and seed is reused as it is."""
    if scale not in SCALES:
        raise ValueError(f"unknown synthetic scale {scale!r}; known: {sorted(SCALES)}")
    out = Path(out).expanduser().absolute()
    roots = {name: out / name for name in SYNTH_LAYOUTS}
    wanted = {"scale": scale, "seed": int(seed), "version": _VERSION}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return roots
    marker.unlink(missing_ok=True)
    spec = SCALES[scale]
    writers: dict[str, Callable[[Path, np.random.Generator], None]] = {
        "pretrain": lambda root, rng: _imagefolder(root, rng, spec, spec.classes["pretrain"], "c"),
        "imagenet": lambda root, rng: _imagefolder(root, rng, spec, spec.classes["imagenet"], "n0"),
        "inat2018": lambda root, rng: _inat(root, rng, spec, spec.classes["inat2018"], "2018", 0),
        "inat2019": lambda root, rng: _inat(root, rng, spec, spec.classes["inat2019"], "2019", 100),
        "places205": lambda root, rng: _places205(root, rng, spec, spec.classes["places205"]),
        "places365": lambda root, rng: _places365(root, rng, spec, spec.classes["places365"]),
        "coco": lambda root, rng: _coco(root, rng, spec),
        "ade20k": lambda root, rng: _ade20k(root, rng, spec),
    }
    for k, (name, write) in enumerate(writers.items()):
        shutil.rmtree(roots[name], ignore_errors=True)
        roots[name].mkdir(parents=True)
        write(roots[name], np.random.default_rng([seed, k]))
    marker.write_text(json.dumps(wanted))
    return roots


# --------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, width: int, height: int, tint=None) -> np.ndarray:
    """A smooth two-colour gradient with grain, so nothing is learnable from flat pixels."""
    a = rng.integers(40, 216, 3) if tint is None else np.asarray(tint)
    b = rng.integers(40, 216, 3)
    t = np.linspace(0.0, 1.0, width)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, height)[:, None, None]
    img = a * (1 - t) + b * t + rng.normal(0, 10, (height, width, 3))
    return np.broadcast_to(img, (height, width, 3))


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    w = r / 3  # cross
    return [
        (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
        (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
    ]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> list[float]:
    """Draw ``shape`` and return its polygon (flat ``x, y`` list; circles: a 24-gon)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return [float(v) for a in angles for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
    points = _shape_points(shape, cx, cy, r)
    draw.polygon(points, fill=fill)
    return [float(v) for p in points for v in p]


def _jitter(rng: np.random.Generator, colour) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.asarray(colour) + rng.integers(-25, 26, 3), 0, 255))


def object_image(rng: np.random.Generator, label: int) -> Image.Image:
    """Class ``label`` = one (shape, colour) combination, drawn at a random place and size."""
    width, height = (int(v) for v in rng.integers(CLASSIFICATION_SIZE[0], CLASSIFICATION_SIZE[1] + 1, 2))
    img = Image.fromarray(np.clip(_background(rng, width, height), 0, 255).astype(np.uint8))
    r = min(width, height) * rng.uniform(0.2, 0.35)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    _draw(ImageDraw.Draw(img), SHAPES[label % len(SHAPES)], cx, cy, r, _jitter(rng, COLOURS[label % len(COLOURS)]))
    return img


def _scene_image(rng: np.random.Generator, label: int, num_classes: int) -> Image.Image:
    """Class ``label`` = stripe orientation and colour scheme, at random frequency and phase."""
    width, height = (int(v) for v in rng.integers(CLASSIFICATION_SIZE[0], CLASSIFICATION_SIZE[1] + 1, 2))
    angle = np.pi * label / num_classes + rng.normal(0, 0.05)
    y, x = np.mgrid[0:height, 0:width]
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(0.25, 0.45) + rng.uniform(0, 2 * np.pi))
    a, b = np.asarray(_jitter(rng, COLOURS[label % len(COLOURS)])), np.asarray(_jitter(rng, (128, 128, 128)))
    t = (wave[..., None] + 1) / 2
    pixels = a * t + b * (1 - t) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


def _class_samples(spec: _Scale, num_classes: int):
    """``(split, label, index)`` for every classification image, classes interleaved."""
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for n in range(per_class):
            for label in range(num_classes):
                yield split, label, n * num_classes + label


# --------------------------------------------------------------------------- layouts


def _imagefolder(root: Path, rng: np.random.Generator, spec: _Scale, num_classes: int, prefix: str) -> None:
    for split, label, n in _class_samples(spec, num_classes):
        _save_jpeg(object_image(rng, label), root / split / f"{prefix}{label:04d}" / f"{split}_{n:05d}.jpg")


def _inat(root: Path, rng: np.random.Generator, spec: _Scale, num_classes: int, year: str, id_offset: int) -> None:
    categories = [
        {"id": id_offset + k, "name": f"species_{year}_{k}", "supercategory": "Plantae" if k % 2 else "Animalia"}
        for k in range(num_classes)
    ]
    docs = {s: {"info": {"year": year}, "images": [], "annotations": [], "categories": categories} for s in ("train", "val")}
    for image_id, (split, label, n) in enumerate(_class_samples(spec, num_classes)):
        cat = categories[label]
        file_name = f"train_val{year}/{cat['supercategory']}/{cat['id']}/{split}_{n:05d}.jpg"
        img = object_image(rng, label)
        _save_jpeg(img, root / file_name)
        docs[split]["images"].append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
        docs[split]["annotations"].append({"id": image_id, "image_id": image_id, "category_id": cat["id"]})
    for split, doc in docs.items():
        (root / f"{split}{year}.json").write_text(json.dumps(doc))


def _places205(root: Path, rng: np.random.Generator, spec: _Scale, num_classes: int) -> None:
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for split, label, n in _class_samples(spec, num_classes):
        rel = f"images/scene{label:03d}/{split}_{n:05d}.jpg"
        _save_jpeg(_scene_image(rng, label, num_classes), root / rel)
        lines[split].append(f"{rel} {label}")
    for split, entries in lines.items():
        (root / f"{split}.txt").write_text("\n".join(entries) + "\n")


def _places365(root: Path, rng: np.random.Generator, spec: _Scale, num_classes: int) -> None:
    """Places365's own layout: train paths under ``data_256`` with a leading slash, val
    images flat in ``val_256``, class names in ``categories_places365.txt``."""
    names = [f"/{chr(ord('a') + k)}/place{k:03d}" for k in range(num_classes)]
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for split, label, n in _class_samples(spec, num_classes):
        if split == "train":
            rel, path = f"{names[label]}/{n + 1:08d}.jpg", root / "data_256" / names[label].lstrip("/") / f"{n + 1:08d}.jpg"
        else:
            rel = f"Places365_val_{n + 1:08d}.jpg"
            path = root / "val_256" / rel
        _save_jpeg(_scene_image(rng, num_classes - 1 - label, num_classes), path)
        lines[split].append(f"{rel} {label}")
    (root / "places365_train_standard.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "places365_val.txt").write_text("\n".join(lines["val"]) + "\n")
    (root / "categories_places365.txt").write_text("\n".join(f"{n} {k}" for k, n in enumerate(names)) + "\n")


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
    counts = np.diff(np.concatenate(([0], change))).tolist()
    return {"counts": [int(c) for c in counts], "size": list(mask.shape)}


def _dense_objects(rng: np.random.Generator, classes: dict[int, str]) -> list[tuple[int, str, float, float, float]]:
    """1-3 objects, one per 64 x 64 quadrant so instances never overlap: (class, shape, cx, cy, r)."""
    quadrants = rng.permutation(4)[: int(rng.integers(1, 4))]
    ids = sorted(classes)
    objects = []
    for q in quadrants:
        cls = ids[int(rng.integers(len(ids)))]
        r = rng.uniform(10, 26)
        cx = (q % 2) * 64 + rng.uniform(r + 2, 62 - r)
        cy = (q // 2) * 64 + rng.uniform(r + 2, 62 - r)
        objects.append((cls, classes[cls], cx, cy, r))
    return objects


def _coco(root: Path, rng: np.random.Generator, spec: _Scale) -> None:
    """Boxes + instance masks: squares/triangles as polygons, circles as RLE (compressed
    and uncompressed alternately), category ids non-contiguous."""
    (root / "annotations").mkdir(parents=True)
    ann_id, image_id = 1, 1
    for split, count in (("train", spec.dense_train), ("val", spec.dense_val)):
        doc = {
            "images": [],
            "annotations": [],
            "categories": [{"id": k, "name": v, "supercategory": "shape"} for k, v in COCO_CATEGORIES.items()],
        }
        for n in range(count):
            img = Image.fromarray(np.clip(_background(rng, DENSE_SIZE, DENSE_SIZE), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for cls, shape, cx, cy, r in _dense_objects(rng, COCO_CATEGORIES):
                canvas = Image.new("L", (DENSE_SIZE, DENSE_SIZE))
                polygon = _draw(ImageDraw.Draw(canvas), shape, cx, cy, r, 1)
                _draw(draw, shape, cx, cy, r, _jitter(rng, COLOURS[int(rng.integers(len(COLOURS)))]))
                mask = np.asarray(canvas, dtype=np.uint8)
                ys, xs = np.nonzero(mask)
                if shape != "circle":
                    segmentation = [polygon]
                elif ann_id % 2:
                    segmentation = _uncompressed_rle(mask)
                else:
                    segmentation = mask_utils.encode(np.asfortranarray(mask))
                    segmentation["counts"] = segmentation["counts"].decode("ascii")
                doc["annotations"].append(
                    {
                        "id": ann_id, "image_id": image_id, "category_id": cls, "iscrowd": 0,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                        "area": int(mask.sum()), "segmentation": segmentation,
                    }
                )
                ann_id += 1
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(img, root / f"{split}2017" / file_name)
            doc["images"].append({"id": image_id, "file_name": file_name, "width": DENSE_SIZE, "height": DENSE_SIZE})
            image_id += 1
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))


def _ade20k(root: Path, rng: np.random.Generator, spec: _Scale) -> None:
    """Label maps: a real background class (1) over most pixels, shaped object classes
    2..4 each with its own colour, and a strip of unlabelled (0, ignored) noise."""
    base = root / "ADEChallengeData2016"
    for split, folder, count in (("train", "training", spec.dense_train), ("val", "validation", spec.dense_val)):
        (base / "annotations" / folder).mkdir(parents=True)
        for n in range(count):
            pixels = _background(rng, DENSE_SIZE, DENSE_SIZE, tint=(150, 150, 110)).copy()
            labels = np.full((DENSE_SIZE, DENSE_SIZE), ADE_BACKGROUND, np.uint8)
            width = int(rng.integers(6, 14))
            strip = (slice(None), slice(0, width)) if rng.random() < 0.5 else (slice(DENSE_SIZE - width, None), slice(None))
            pixels[strip] = rng.integers(0, 256, pixels[strip].shape)
            labels[strip] = 0
            img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            label_img = Image.fromarray(labels)
            for cls, shape, cx, cy, r in _dense_objects(rng, ADE_OBJECTS):
                _draw(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(rng, COLOURS[cls - 2]))
                _draw(ImageDraw.Draw(label_img), shape, cx, cy, r, cls)
            stem = f"ADE_{folder[:5]}_{n + 1:08d}"
            _save_jpeg(img, base / "images" / folder / f"{stem}.jpg")
            label_img.save(base / "annotations" / folder / f"{stem}.png")
