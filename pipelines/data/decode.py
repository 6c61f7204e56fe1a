"""The one decode path shared by training, ``mixmae data check`` and packing.

Every image goes through :func:`decode_image`, which never raises for bad input: it
returns ``ok`` (an RGB image as stored), ``converted`` (made RGB and/or EXIF-transposed;
``reason`` says what was done) or ``skipped`` (``image`` is None; ``reason`` is one of
:data:`SKIP_REASONS`). Callers count the outcome (see :mod:`pipelines.data.quality`).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines import storage

#: A path, or encoded bytes (packed shards); None stands for a file that was missing when packed.
Source = Union[str, os.PathLike, bytes, None]
Status = Literal["ok", "converted", "skipped"]
#: Asked by :func:`decode_image` with the oriented full size ``(w, h)``; answers the size the
#: decoded image must at least have (JPEG decoders can then skip detail), or None for full size.
DraftPlan = Callable[[tuple[int, int]], Optional[tuple[int, int]]]

#: Far above any training image, far below what takes a worker's memory (8192 x 8192).
MAX_PIXELS = 8192 * 8192
#: Smaller images carry no usable content (1x1 tracking pixels, icons).
MIN_SIDE = 8

SKIP_REASONS = (
    "missing",  # the file does not exist (e.g. an annotation file references it)
    "empty",  # zero bytes
    "not_an_image",  # no image format recognises the bytes
    "truncated",  # the image data ends early
    "corrupt",  # the decoder failed on the data
    "too_large",  # above max_pixels, or PIL's decompression-bomb guard fired
    "too_small",  # a side below min_side
)
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodeResult:
    image: Optional[Image.Image]
    status: Status
    reason: Optional[str] = None
    #: full-resolution ``(w, h)`` after EXIF orientation; None when skipped before the header was read
    size: Optional[tuple[int, int]] = None
    #: the decoded image is ``size / reduction`` (JPEG draft decoding); 1 when decoded in full
    reduction: int = 1


def read_bytes(src: Source) -> bytes | str:
    """The file's bytes (a path, or an object store URL), or a skip reason (``missing`` / ``empty``)."""
    if src is None:
        return "missing"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            data = storage.read_bytes(os.fspath(src))
        except FileNotFoundError:
            return "missing"
        except IsADirectoryError:
            return "not_an_image"
    return data if data else "empty"


def _skipped(reason: str, size: Optional[tuple[int, int]] = None) -> DecodeResult:
    return DecodeResult(None, "skipped", reason, size)


def decode_image(
    src: Source,
    *,
    max_pixels: int = MAX_PIXELS,
    min_side: int = MIN_SIDE,
    draft: Optional[DraftPlan] = None,
) -> DecodeResult:
    """Decode a path or encoded bytes to an RGB PIL image, never raising for bad input.

    The format is detected from the content, so a PNG named ``.jpg`` simply decodes.
    ``draft`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale when the caller only needs a
    smaller image; the result's ``reduction`` says by how much.
    """
    data = read_bytes(src)
    if isinstance(data, str):
        return _skipped(data)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; a bomb is a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _skipped("too_large")
    except UnidentifiedImageError:
        return _skipped("not_an_image")
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        return _skipped("corrupt")

    width, height = img.size
    orientation = _orientation(img)
    size = (height, width) if orientation in _SWAPS_AXES else (width, height)
    if width * height > max_pixels:
        return _skipped("too_large", size)
    if min(width, height) < min_side:
        return _skipped("too_small", size)

    reduction = 1
    wanted = draft(size) if draft is not None else None
    if wanted is not None and img.format == "JPEG":
        stored_wanted = wanted[::-1] if orientation in _SWAPS_AXES else wanted
        plan = img.draft(None, (max(1, int(stored_wanted[0])), max(1, int(stored_wanted[1]))))
        if plan is not None:
            reduction = round(width / plan[1][2])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _skipped("too_large", size)
    except OSError as err:
        return _skipped("truncated" if "truncated" in str(err) else "corrupt", size)
    except (SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError):
        return _skipped("corrupt", size)

    notes = []
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        notes.append("exif_rotated")
    if img.mode != "RGB":
        notes.append(f"mode_{img.mode}")
        img = _to_rgb(img)
    return DecodeResult(img, "converted" if notes else "ok", "+".join(notes) or None, size, reduction)


def _orientation(img: Image.Image) -> Optional[int]:
    try:
        return img.getexif().get(_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block must not cost the image; keep it as stored
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own conversion clips >255 to white; rescale the high-bit-depth range instead.
        values = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA") or (img.mode == "L" and "transparency" in img.info):
        # Palette transparency only survives (and stops PIL warning) through RGBA.
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_label_map(src: Source, expected_size: Optional[tuple[int, int]] = None) -> np.ndarray | str:
    """A single-channel integer label map ``(H, W)`` as uint8, or a skip reason.

    Reasons: ``label_missing``, ``label_empty``, ``label_unreadable``, ``label_size_mismatch``
    (the map must match the image's ``(w, h)`` when ``expected_size`` is given).
    """
    data = read_bytes(src)
    if isinstance(data, str):
        return f"label_{data}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "P", "I;16", "I", "1"):
                return "label_unreadable"
            if expected_size is not None and img.size != tuple(expected_size):
                return "label_size_mismatch"
            labels = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error):
        return "label_unreadable"
    if labels.max(initial=0) > 255:
        return "label_unreadable"
    return labels.astype(np.uint8)


def to_chw(img: Image.Image) -> np.ndarray:
    """An RGB PIL image as a contiguous uint8 ``(3, H, W)`` array."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
