"""Decode one image or caption, or say exactly why it cannot be used.

Web-scale data always holds some broken samples. Readers turn each into a `BadSample`, the
datasets hand it on as a `{"bad": reason}` record, and a `SkipCounter` reports them, so a run
never dies on one bad file and never loses samples without saying so.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections import Counter
from typing import BinaryIO

import numpy as np
from PIL import Image

_DROP = "re-download it or drop the sample"


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short category for the skip report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(
    source: str | os.PathLike | bytes,
    max_pixels: int = 64_000_000,
    *,
    name: str | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Fully decode `source` (a path or encoded bytes) to an RGB image.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. `name` labels bytes in error messages (e.g. the webdataset key).

    `min_side` (the side the image is resized to next): a JPEG at least twice that size on both
    sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's draft mode), the smallest
    scale that keeps both sides >= `min_side`. That costs a fraction of a full decode and, after the
    same resize and crop, differs from it by about one grey level on average. Other formats decode
    in full.
    """
    if isinstance(source, bytes):
        name = name or "<image bytes>"
        if not source:
            raise BadSample("empty_file", f"{name}: image is empty (0 bytes); {_DROP}")
        return _decode(io.BytesIO(source), name, max_pixels, min_side)
    path = os.fspath(source)
    name = name or path
    if not os.path.isfile(path):
        raise BadSample("missing_file", f"{name}: no such file; check the path and the data root")
    if os.path.getsize(path) == 0:
        raise BadSample("empty_file", f"{name}: file is empty (0 bytes); {_DROP}")
    try:
        file = open(path, "rb")  # opened apart from decoding so that access errors read as such
    except OSError as e:
        raise BadSample("unreadable", f"{name}: cannot be opened ({e}); check its permissions") from None
    with file:
        return _decode(file, name, max_pixels, min_side)


def _decode(file: BinaryIO, name: str, max_pixels: int, min_side: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():  # we apply our own, stricter, size limit below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file)
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", f"{name}: {e}; resize it or drop the sample") from None
    except Image.UnidentifiedImageError:
        raise BadSample("unreadable", f"{name}: not an image PIL can read; {_DROP}") from None
    except Exception as e:  # a known format whose header is cut short or corrupt
        raise BadSample("truncated", f"{name}: truncated or corrupt image header ({e}); {_DROP}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise BadSample(
                "too_large",
                f"{name}: {width}x{height} = {width * height} pixels is over max_pixels={max_pixels}; "
                "resize it or raise max_pixels",
            )
        try:
            if min_side is not None and img.format == "JPEG" and min(width, height) >= 2 * min_side:
                img.draft(img.mode, (min_side, min_side))
            img.load()
        except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ... on bad data
            raise BadSample("truncated", f"{name}: truncated or corrupt image data ({e}); {_DROP}") from None
        return to_rgb(img, name=name)


def to_rgb(img: Image.Image, *, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16-bit and float data are rescaled.

    PIL's own `convert("RGB")` clips 16-bit values at 255, which turns most 16-bit images white.
    """
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img)))
    try:
        if img.has_transparency_data:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img.convert("RGBA"))
        return img.convert("RGB")
    except ValueError as e:
        raise BadSample(
            "bad_mode", f"{name}: mode {img.mode} cannot be converted to RGB ({e}); re-save it as RGB"
        ) from None


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Integer data (modes I;16*, I) is taken as 16-bit, 0..65535; float data (mode F) as 0..1,
    or as 0..255 when it goes above 1."""
    if np.issubdtype(pixels.dtype, np.integer):
        scaled = pixels / 257.0
    else:
        pixels = np.nan_to_num(pixels.astype(np.float64))
        scaled = pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_caption(caption: object, *, name: str = "<caption>") -> str:
    """Return the stripped caption; bytes must be UTF-8, and missing or blank captions are bad."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample(
                "bad_caption_encoding", f"{name}: caption is not valid UTF-8 ({e}); re-encode it as UTF-8"
            ) from None
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        caption = ""
    caption = str(caption).strip()
    if not caption:
        raise BadSample("empty_caption", f"{name}: caption is empty; fill it in or drop the sample")
    return caption


class SkipCounter:
    """Counts skipped samples by reason and keeps the first few keys, for stage reports."""

    def __init__(self, max_examples: int = 10):
        self.by_reason: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = max_examples

    def add(self, reason: str, key: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(key)

    @property
    def total(self) -> int:
        return self.by_reason.total()

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.by_reason), "examples": list(self.examples)}
