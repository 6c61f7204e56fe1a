"""Readers for dataset layouts as users have them on disk (nothing is ever downloaded).

Each reader lists a split's images as records ``{path, split, label, width, height,
annotation[, image_id]}`` (absolute paths; ``label`` -1 where there is none; width/height
None where the layout does not say) and returns them with the class names.
References to files that do not exist are kept: they are counted as ``missing`` by
``data prepare`` and skipped (and counted) by the pipeline.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
ADE_NUM_CLASSES = 150


class LayoutError(ValueError):
    """The folder does not hold the layout it was said to hold."""


@dataclass
class Listing:
    layout: str
    records: list[dict[str, Any]]
    #: name of each label index (classification) or of each contiguous category 1..K (coco)
    classes: list[str]
    #: "coco" (annotation = JSON list of the image's COCO annotations), "label_map"
    #: (annotation = path of a PNG label map) or "" (no annotation)
    annotation_kind: str = ""
    #: COCO category id of each contiguous category (coco only)
    category_ids: list[int] = field(default_factory=list)
    #: files seen but not listed (no image extension), per split
    ignored: dict[str, int] = field(default_factory=dict)


def _record(path: Path, split: str, label: int = -1, width=None, height=None, annotation=None) -> dict[str, Any]:
    return {
        "path": str(path.absolute()),
        "split": split,
        "label": int(label),
        "width": width,
        "height": height,
        "annotation": annotation,
    }


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LayoutError(f"{what} not found: {path}")
    return path


def _splits(split: Optional[str], available: list[str], root: Path, layout: str) -> list[str]:
    if split is None:
        if not available:
            raise LayoutError(f"no split of the {layout} layout found under {root}")
        return available
    if split not in available:
        raise LayoutError(f"split {split!r} of the {layout} layout not found under {root} (found: {available})")
    return [split]


def read_imagefolder(root: Path, split: Optional[str] = None) -> Listing:
    """``root/<split>/<class>/<image>``, any folder a split (``train``, ``val``, a labelled
    subset such as ``train_few``); labels index the sorted class folders of all splits."""
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = _splits(split, available, root, "imagefolder")
    classes = sorted({c.name for s in available for c in (root / s).iterdir() if c.is_dir()})
    index = {name: i for i, name in enumerate(classes)}
    records, ignored = [], {}
    for s in splits:
        ignored[s] = 0
        for dirpath, dirnames, filenames in os.walk(root / s):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root / s).parts
            for name in sorted(filenames):
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored[s] += 1
                    continue
                records.append(_record(Path(dirpath) / name, s, index[rel[0]] if rel else -1))
    return Listing("imagefolder", records, classes, ignored=ignored)


def _inat_annotation_file(root: Path, split: str, annotation_file: Optional[str]) -> Path:
    if annotation_file:
        return root / annotation_file
    found = sorted(root.glob(f"{split}20[0-9][0-9].json"))
    if len(found) != 1:
        raise LayoutError(
            f"expected one {split}20XX.json under {root}, found {[p.name for p in found]}; "
            "name it with --annotation-file"
        )
    return found[0]


def read_inat(root: Path, split: Optional[str] = None, annotation_file: Optional[str] = None) -> Listing:
    """iNaturalist 2018/2019: ``{split}20XX.json`` (COCO-like images / annotations /
    categories) with image ``file_name`` relative to ``root``."""
    if split is None and annotation_file:
        raise LayoutError("--annotation-file names one split's file; give --split too")
    available = sorted(s for s in ("train", "val", "test") if list(root.glob(f"{s}20[0-9][0-9].json")))
    if annotation_file:
        available = sorted(set(available) | {split})
    splits = _splits(split, available, root, "inat")
    documents = {s: json.loads(_inat_annotation_file(root, s, annotation_file).read_text()) for s in splits}
    category_ids = sorted({c["id"] for doc in documents.values() for c in doc.get("categories", [])})
    names = {c["id"]: c.get("name", str(c["id"])) for doc in documents.values() for c in doc.get("categories", [])}
    index = {cid: i for i, cid in enumerate(category_ids)}
    records = []
    for s, doc in documents.items():
        label_of = {a["image_id"]: index[a["category_id"]] for a in doc.get("annotations", [])}
        for image in doc["images"]:
            records.append(
                _record(root / image["file_name"], s, label_of.get(image["id"], -1), image.get("width"), image.get("height"))
            )
    return Listing("inat", records, [names[c] for c in category_ids])


PLACES_LIST_FILES = {
    "train": ("train.txt", "places365_train_standard.txt", "places365_train_challenge.txt", "train_places205.csv"),
    "val": ("val.txt", "places365_val.txt", "val_places205.csv"),
    "test": ("test.txt", "places365_test.txt"),
}
#: Places365 ships list paths relative to per-split image folders.
PLACES_IMAGE_DIRS = ("", "data_256", "data_large", "val_256", "val_large", "test_256", "test_large", "images")
PLACES_CATEGORY_FILES = ("categories_places365.txt", "categories_places205.txt", "categories.txt")


def _find_list_file(root: Path, split: str) -> Optional[Path]:
    for name in PLACES_LIST_FILES.get(split, (f"{split}.txt",)):
        for candidate in (root / name, root / "trainvalsplit_places205" / name):
            if candidate.is_file():
                return candidate
    return None


def _guess_image_dir(root: Path, relpaths: list[str]) -> Path:
    probe = relpaths[:20]
    best = max(PLACES_IMAGE_DIRS, key=lambda d: sum((root / d / p).exists() for p in probe))
    return root / best


def read_places(
    root: Path, split: Optional[str] = None, list_file: Optional[str] = None, image_dir: Optional[str] = None
) -> Listing:
    """Places205/365: list files of ``relative/path label`` lines plus the images.

    Default list files per split: :data:`PLACES_LIST_FILES`; paths resolve against
    ``image_dir`` (default: whichever of :data:`PLACES_IMAGE_DIRS` holds the first listed
    files, e.g. ``data_256`` for train and ``val_256`` for val in Places365). Lines without
    a label (test lists) get -1. Class names come from a categories file when present.
    """
    if split is None and (list_file or image_dir):
        raise LayoutError("--list-file/--image-dir describe one split; give --split too")
    if list_file:
        lists = {split: root / list_file}
    else:
        lists = {s: _find_list_file(root, s) for s in set(PLACES_LIST_FILES) | ({split} if split else set())}
    available = sorted(s for s, path in lists.items() if path is not None and path.is_file())
    splits = _splits(split, available, root, "places")
    records, max_label = [], -1
    for s in splits:
        entries = []
        for line in lists[s].read_text().splitlines():
            parts = line.strip().rsplit(maxsplit=1)
            if not parts:
                continue
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                entries.append((parts[0].lstrip("/"), int(parts[1])))
            else:
                entries.append((line.strip().lstrip("/"), -1))
        base = root / image_dir if image_dir else _guess_image_dir(root, [p for p, _ in entries])
        for rel, label in entries:
            records.append(_record(base / rel, s, label))
            max_label = max(max_label, label)
    classes = [str(i) for i in range(max_label + 1)]
    for name in PLACES_CATEGORY_FILES:
        if (root / name).is_file():
            for line in (root / name).read_text().splitlines():
                parts = line.strip().rsplit(maxsplit=1)
                if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) < len(classes):
                    classes[int(parts[1])] = parts[0].lstrip("/")
            break
    return Listing("places", records, classes)


def read_coco(root: Path, split: Optional[str] = None, year: str = "2017") -> Listing:
    """COCO: ``annotations/instances_{split}{year}.json`` + ``{split}{year}/`` images.

    Each record keeps the COCO image id and, as ``annotation``, the JSON list of that
    image's annotations (bbox, category_id, segmentation, iscrowd, area).
    """
    ann_dir = _require_dir(root / "annotations", "COCO annotations folder")
    available = sorted(s for s in ("train", "val") if (ann_dir / f"instances_{s}{year}.json").is_file())
    splits = _splits(split, available, root, "coco")
    records, categories = [], {}
    for s in splits:
        doc = json.loads((ann_dir / f"instances_{s}{year}.json").read_text())
        categories.update({c["id"]: c["name"] for c in doc["categories"]})
        per_image: dict[int, list] = {}
        for ann in doc.get("annotations", []):
            per_image.setdefault(ann["image_id"], []).append(
                {k: ann[k] for k in ("bbox", "category_id", "segmentation", "iscrowd", "area") if k in ann}
            )
        for image in doc["images"]:
            rec = _record(
                root / f"{s}{year}" / image["file_name"], s, -1, image.get("width"), image.get("height"),
                json.dumps(per_image.get(image["id"], [])),
            )
            rec["image_id"] = int(image["id"])
            records.append(rec)
    category_ids = sorted(categories)
    return Listing("coco", records, [categories[c] for c in category_ids], "coco", category_ids)


ADE_SPLITS = {"train": "training", "val": "validation"}


def read_ade20k(root: Path, split: Optional[str] = None) -> Listing:
    """ADE20K SceneParsing: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/.../*.png`` label maps (0 = other, 1..150 = classes). ``root`` may be the
    folder holding ``ADEChallengeData2016`` or that folder itself."""
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    _require_dir(base / "images", "ADE20K images folder")
    available = sorted(s for s, d in ADE_SPLITS.items() if (base / "images" / d).is_dir())
    splits = _splits(split, available, root, "ade20k")
    records, ignored = [], {}
    for s in splits:
        folder = base / "images" / ADE_SPLITS[s]
        ignored[s] = 0
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored[s] += 1
                continue
            label_map = base / "annotations" / ADE_SPLITS[s] / f"{path.stem}.png"
            records.append(_record(path, s, annotation=str(label_map.absolute())))
    return Listing("ade20k", records, [], "label_map", ignored=ignored)


LAYOUTS: dict[str, Callable[..., Listing]] = {
    "imagefolder": read_imagefolder,
    "inat": read_inat,
    "places": read_places,
    "coco": read_coco,
    "ade20k": read_ade20k,
}


def read_layout(layout: str, root: str | Path, split: Optional[str] = None, **options: Any) -> Listing:
    """List a dataset; ``options`` are the layout's extras (inat: ``annotation_file``;
    places: ``list_file``, ``image_dir``; coco: ``year``). Unset (None) options are ignored."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    root = Path(root).expanduser().absolute()
    _require_dir(root, f"{layout} root")
    reader = LAYOUTS[layout]
    given = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(reader).parameters) - {"root", "split"}
    if unknown := sorted(set(given) - accepted):
        raise LayoutError(f"option(s) {unknown} do not apply to the {layout} layout (it takes {sorted(accepted)})")
    return reader(root, split, **given)
