"""Reading every image a user or a dataset hands us the same way: any Pillow mode, upright.

:func:`load_image` is the one entry point (references, masks, depth maps, training images).
It applies the EXIF orientation, scales high-bit-depth images by their type's range (a
16-bit PNG reads as its 8-bit twin, not clipped to white), and composites transparency on a
uniform background (white for pictures, black for masks: transparent means "not painted").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.video import MediaReadError, existing_media

WHITE, BLACK = 1.0, 0.0
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _grey_levels(image: Image.Image) -> np.ndarray:
    """A one-band image of a high-bit-depth mode (``I;16*``, ``I``, ``F``) as float32 (H, W)
    in [0, 1]: 16-bit by 65535; ``I`` by 65535 when its values fit 16 bits (16-bit PNG and
    TIFF files open as ``I`` in older Pillow), else by its own range; ``F`` as is when in
    [0, 1], else by its own range."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT_MODES:
        return (values / 65535).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if image.mode == "I" and low >= 0 and high <= 65535:
        return (values / 65535).astype(np.float32)
    if image.mode == "F" and low >= 0 and high <= 1:
        return values.astype(np.float32)
    span = high - low
    return ((values - low) / span if span > 0 else np.zeros_like(values)).astype(np.float32)


def image_levels(image: Image.Image, mode: str = "RGB", background: float = WHITE) -> np.ndarray:
    """Pixels of a Pillow image as float32 in [0, 1]: (H, W, 3) for ``mode="RGB"``, (H, W)
    for ``mode="L"``.

    Every Pillow mode is handled: ``1``, ``L``, ``P`` (with or without transparency),
    ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``LA``, ``RGBA``, ``La``, ``RGBa``,
    ``I;16``/``I;16B``, ``I``, ``F``. Alpha is composited on ``background`` (0 black, 1
    white). Grey from colour uses ITU-R 601 luma, as Pillow's ``convert("L")`` does. The
    EXIF orientation is *not* applied here (:func:`load_image` does it).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        grey = _grey_levels(image)
        return np.repeat(grey[..., None], 3, axis=-1) if mode == "RGB" else grey
    has_alpha = image.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32) / 255
        alpha = rgba[..., 3:]
        rgb = rgba[..., :3] * alpha + background * (1 - alpha)
        if mode == "RGB":
            return rgb
        return rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.asarray(image.convert(mode)).astype(np.float32) / 255


def to_uint8(levels: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] -> uint8, rounded."""
    return np.round(np.clip(levels, 0, 1) * 255).astype(np.uint8)


def load_image(
    path: str | Path, mode: str = "RGB", background: float = WHITE, exact: bool = False
) -> np.ndarray:
    """An image file, upright (EXIF orientation applied), as (H, W, 3) (``mode="RGB"``) or
    (H, W) (``mode="L"``): uint8, or float32 levels in [0, 1] with ``exact`` (keeps the
    precision of 16-bit and float images, for depth maps).

    Multi-frame files (GIF, TIFF) give their first frame. Raises :class:`MediaReadError`:
    ``missing``, ``empty``, or ``unreadable`` (not an image Pillow opens, or broken).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    path = existing_media(path)
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            levels = image_levels(upright, mode, background)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise MediaReadError(path, "unreadable", str(err)) from err
    return levels if exact else to_uint8(levels)
