"""Reading clips from video files: frame choice, resize-and-crop, classified errors.

Frames come through :mod:`data.reader` (decord where it works, PyAV for GIF, APNG and the
rest), upright: a phone's portrait video trains as portrait, not sideways.

A clip is ``num_frames`` frames at a target ``fps`` (or every ``stride``-th frame), resized so
that it covers the target size (aspect kept) and cropped to it: at random when a random
generator is given (training), from the centre otherwise (validation). Files that cannot give
a clip raise :class:`MediaReadError` with a ``reason`` the datasets count and report.

Sizes must be multiples of 8, the autoencoder's factor. Stable Diffusion's UNet needs
multiples of 64 (its configs use 256 or 512); tiny models run at 32 or 64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.reader import FrameReader, VideoReadError, VideoStream, probe_stream

SIZE_MULTIPLE = 8
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
REASONS = ("missing", "empty", "unreadable", "corrupt", "too_short")


class MediaReadError(Exception):
    """A video or image file that cannot give a sample; ``reason`` is one of ``REASONS``."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}; expected one of {REASONS}")
        message = f"{path}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        super().__init__(message)
        self.path, self.reason, self.detail = str(path), reason, detail

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason, self.detail))


@dataclass
class Clip:
    """Frames read from one video: pixels, the source frame indices, the clip's frame rate."""

    frames: torch.Tensor  # (F, 3, H, W) float32 in [-1, 1]
    indices: list[int]  # source frame index of each clip frame
    fps: float  # frames per second of the clip as read (source fps / step)


def parse_size(size: int | Sequence[int], multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """``256`` or ``(H, W)`` -> ``(H, W)``, checked to be positive multiples of ``multiple``."""
    if isinstance(size, int):
        height = width = size
    else:
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"size must be a positive multiple of {multiple}, got {size}")
    return height, width


def cover_size(source_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The smallest (h, w) with the source's aspect ratio that covers ``target_hw``."""
    scale = max(target_hw[0] / source_hw[0], target_hw[1] / source_hw[1])
    height = max(target_hw[0], round(source_hw[0] * scale))
    width = max(target_hw[1], round(source_hw[1] * scale))
    return height, width


def crop_offsets(
    source_hw: tuple[int, int], target_hw: tuple[int, int], rng: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner of a ``target_hw`` crop: uniform at random with ``rng``, else central."""
    spare_h, spare_w = source_hw[0] - target_hw[0], source_hw[1] - target_hw[1]
    if rng is None:
        return spare_h // 2, spare_w // 2
    return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))


def frame_step(source_fps: float, fps: float | None, stride: int | None) -> float:
    """Source frames between consecutive clip frames, from a target ``fps`` or a ``stride``."""
    if fps is not None and stride is not None:
        raise ValueError("give either fps or stride, not both")
    if stride is not None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return float(stride)
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        return source_fps / fps
    return 1.0


def choose_indices(
    num_frames: int,
    step: float,
    first: int,
    last: int,
    rng: np.random.Generator | None,
) -> list[int] | None:
    """Indices of a clip inside source frames ``[first, last)``; None if it does not fit.

    With ``rng`` the clip starts anywhere it fits; without, it starts at ``first``.
    """
    offsets = [round(i * step) for i in range(num_frames)]
    latest_start = last - 1 - offsets[-1]
    if latest_start < first:
        return None
    start = first if rng is None else int(rng.integers(first, latest_start + 1))
    return [start + o for o in offsets]


def existing_media(path: str | Path) -> Path:
    """``path`` as a Path; a missing or zero-byte file raises a classified MediaReadError."""
    path = Path(path)
    if not path.exists():
        raise MediaReadError(path, "missing")
    if path.stat().st_size == 0:
        raise MediaReadError(path, "empty")
    return path


def probe_upright(path: str | Path) -> VideoStream:
    """The video stream of ``path`` (upright size, rotation, backend; no per-frame times),
    or a classified MediaReadError: ``missing``, ``empty``, ``unreadable``, ``corrupt``."""
    path = existing_media(path)
    try:
        return probe_stream(path, timestamps=False)
    except VideoReadError as err:
        raise MediaReadError(path, _reason(err), err.detail) from err


def probe_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the first video stream as displayed (its rotation applied)."""
    stream = probe_upright(path)
    return stream.height, stream.width


def _reason(err: VideoReadError) -> str:
    return "corrupt" if err.kind == "corrupt" else "unreadable"


def read_clip(
    path: str | Path,
    num_frames: int,
    size: int | Sequence[int],
    *,
    fps: float | None = None,
    stride: int | None = None,
    start: float | None = None,
    end: float | None = None,
    rng: np.random.Generator | None = None,
    num_threads: int = 1,
) -> Clip:
    """Read ``num_frames`` frames of ``path`` at ``fps`` (or ``stride``), resized and cropped.

    ``start``/``end`` (seconds) bound the segment the clip comes from. With ``rng`` the clip
    starts at random in the segment and the crop is random (training); without, the clip
    starts at ``start`` and the crop is central (validation). Raises :class:`MediaReadError`.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    target_hw = parse_size(size)
    stream = probe_upright(path)
    resized_hw = cover_size((stream.height, stream.width), target_hw)
    try:
        reader = FrameReader(stream, resized_hw, num_threads=num_threads)
    except VideoReadError as err:
        raise MediaReadError(path, _reason(err), err.detail) from err
    total, source_fps = len(reader), stream.fps
    if total == 0 or not math.isfinite(source_fps) or source_fps <= 0:
        raise MediaReadError(path, "unreadable", f"{total} frames at {source_fps} fps")
    step = frame_step(source_fps, fps, stride)
    first = 0 if start is None else max(0, math.floor(start * source_fps))
    last = total if end is None else min(total, math.ceil(end * source_fps))
    indices = choose_indices(num_frames, step, first, last, rng)
    if indices is None:
        detail = f"{num_frames} frames with step {step:g} need more than frames [{first}, {last})"
        raise MediaReadError(path, "too_short", detail)
    try:
        pixels = reader.read(indices)
    except VideoReadError as err:
        raise MediaReadError(path, "corrupt", err.detail) from err
    if pixels.shape[0] != num_frames:
        raise MediaReadError(path, "corrupt", f"decoded {pixels.shape[0]} of {num_frames} frames")
    top, left = crop_offsets(pixels.shape[1:3], target_hw, rng)
    pixels = pixels[:, top : top + target_hw[0], left : left + target_hw[1]]
    return Clip(frames=uint8_to_unit(pixels), indices=indices, fps=source_fps / step)


def uint8_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) float32 in [-1, 1]."""
    frames = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    return frames.float().div_(127.5).sub_(1.0).contiguous()
