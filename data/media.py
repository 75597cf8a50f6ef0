"""Reading the media a user hands to infer.py: videos, frames, images, masks, depth.

Every reader checks its file and raises ``MediaError`` with one line that names the file
and says what is wrong with it (missing, empty, not a video, corrupt, wrong size).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import decord
import numpy as np
import torch
import torch.nn.functional as F
from decord._ffi.base import DECORDError

from data.images import BLACK, WHITE, load_image
from data.video import MediaReadError, existing_media, uint8_to_unit


class MediaError(ValueError):
    """An input file that cannot be used, reported to the user as one line."""


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# Demuxers that open still images or text as a "video" stream.
NOT_VIDEO_FORMATS = {"image2", "tty"}


@dataclass
class SourceVideo:
    """What the reader tells about a video file."""

    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    has_audio: bool


@contextmanager
def native_stderr_silenced():
    """Keep decord/ffmpeg's native log lines off stderr (errors are reported as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def existing(path: str | Path) -> Path:
    """``path`` if it is a non-empty file, else MediaError ("missing" / "empty")."""
    try:
        return existing_media(path)
    except MediaReadError as err:
        raise MediaError(str(err)) from err


def _first_line(err: Exception) -> str:
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return line.rsplit(": ", 1)[-1][:200] if "/src/" in line else line[:200]


def probe_video(path: str | Path) -> SourceVideo:
    """Frame count, fps, size and audio presence of a video, or MediaError saying why not."""
    path = existing(path)
    try:
        with native_stderr_silenced(), av.open(str(path)) as container:
            fmt = container.format.name
            if fmt in NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
                raise MediaError(f"{path}: not a video (it reads as {fmt!r})")
            if not container.streams.video:
                raise MediaError(f"{path}: contains no video frames (no video stream)")
            context = container.streams.video[0].codec_context
            height, width = context.height, context.width
            has_audio = bool(container.streams.audio)
    except (av.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: not a readable video ({_first_line(err)})") from err
    try:
        with native_stderr_silenced():
            reader = decord.VideoReader(str(path), num_threads=1)
            num_frames, fps = len(reader), float(reader.get_avg_fps())
    except (RuntimeError, DECORDError) as err:
        raise MediaError(f"{path}: corrupt video stream ({_first_line(err)})") from err
    if num_frames == 0:
        raise MediaError(f"{path}: contains no video frames")
    if not np.isfinite(fps) or fps <= 0 or height <= 0 or width <= 0:
        raise MediaError(f"{path}: unusable stream ({width}x{height} at {fps} fps)")
    return SourceVideo(str(path), num_frames, fps, height, width, has_audio)


def read_frames(path: str | Path, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Frames ``indices`` of a video at ``size`` (H, W): ``(1, F, 3, H, W)`` in [-1, 1]."""
    out = torch.empty(len(indices), 3, *size)
    try:
        with native_stderr_silenced():
            reader = decord.VideoReader(str(path), width=size[1], height=size[0], num_threads=1)
            for start in range(0, len(indices), 32):
                chunk = reader.get_batch(indices[start : start + 32]).asnumpy()
                out[start : start + len(chunk)] = uint8_to_unit(chunk)
    except (RuntimeError, DECORDError) as err:
        raise MediaError(f"{path}: corrupt video stream ({_first_line(err)})") from err
    return out[None]


def _check_size(path: Path, hw: tuple[int, int], source: SourceVideo, size) -> None:
    if tuple(hw) not in {(source.height, source.width), tuple(size)}:
        raise MediaError(
            f"mask {path} is {hw[1]}x{hw[0]}; it must match the input's {source.width}x"
            f"{source.height} (or the working size {size[1]}x{size[0]})"
        )


def read_image(
    path: str | Path, mode: str = "RGB", background: float = WHITE, exact: bool = False
) -> np.ndarray:
    """An image file, upright, as uint8 (H, W, 3) or (H, W) in ``mode`` "RGB" or "L" (float
    levels in [0, 1] with ``exact``); any Pillow mode, transparency on ``background``
    (:func:`data.images.load_image`). MediaError if it cannot be read."""
    try:
        return load_image(path, mode, background, exact)
    except MediaReadError as err:
        if err.reason in ("missing", "empty"):
            raise MediaError(str(err)) from err
        raise MediaError(f"{err.path}: not a readable image ({err.detail})") from err


def read_mask(path, source: SourceVideo, indices: list[int], size) -> torch.Tensor:
    """A mask (1 = edit) ``(1, F or 1, 1, H, W)`` in [0, 1] from an image or a video.

    An image's transparent pixels count as black (not edited): a mask painted on a
    transparent layer edits where it is painted."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        levels = read_image(path, "L", background=BLACK, exact=True)
        _check_size(path, levels.shape[:2], source, size)
        mask = torch.from_numpy(levels.copy())[None, None]
        return F.interpolate(mask, size=tuple(size), mode="bilinear")[None]
    video = probe_video(path)
    _check_size(path, (video.height, video.width), source, size)
    if video.num_frames != source.num_frames:
        raise MediaError(
            f"mask {path} has {video.num_frames} frames; the input has {source.num_frames}"
        )
    return (read_frames(path, indices, size).mean(dim=2, keepdim=True) + 1) / 2


def read_depth(path, source: SourceVideo, indices: list[int], size) -> torch.Tensor:
    """Depth ``(1, F, 1, H, W)`` from a .npy ``(frames, H, W)``, a grey video or a grey image
    (one depth map for every frame; 16-bit kept exact), near = bright, in [-1, 1] for
    images and videos."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(existing(path), allow_pickle=False)
        except ValueError as err:
            raise MediaError(f"{path}: not a numeric .npy array ({err})") from err
        if array.ndim != 3 or array.shape[0] != source.num_frames:
            raise MediaError(
                f"depth {path} has shape {array.shape}; expected ({source.num_frames}, H, W)"
            )
        depth = torch.from_numpy(np.asarray(array[indices], dtype=np.float32))[:, None]
        return F.interpolate(depth, size=tuple(size), mode="bilinear")[None]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        levels = torch.from_numpy(read_image(path, "L", exact=True).copy())[None, None]
        depth = F.interpolate(levels * 2 - 1, size=tuple(size), mode="bilinear")
        return depth.expand(len(indices), -1, -1, -1)[None]
    video = probe_video(path)
    if video.num_frames != source.num_frames:
        raise MediaError(
            f"depth {path} has {video.num_frames} frames; the input has {source.num_frames}"
        )
    return read_frames(path, indices, size).mean(dim=2, keepdim=True)
