"""Reading the media a user hands to infer.py: videos, frames, images, masks, depth.

Every reader checks its file and raises ``MediaError`` with one line that names the file
and says what is wrong with it (missing, empty, not a video, corrupt, wrong size). Videos go
through :mod:`data.reader` (decord or PyAV, frames upright), images through
:func:`data.images.load_image`, audio through :mod:`data.audio`: everything that can fail
fails here, before the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.audio import AudioPlan, AudioTrack, plan_audio, prepare_audio
from data.images import BLACK, WHITE, load_image
from data.io import FrameTimes
from data.reader import FrameReader, VideoReadError, VideoStream, probe_stream
from data.video import MediaReadError, existing_media, uint8_to_unit


class MediaError(ValueError):
    """An input file that cannot be used, reported to the user as one line."""


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
CONSTANT_RATE, SOURCE_TIMESTAMPS = "constant rate", "source timestamps"


@dataclass
class SourceVideo:
    """What the reader tells about a video file. Sizes are the displayed (upright) ones;
    ``rotation`` (degrees clockwise) and ``mirrored`` are what reading applies."""

    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    has_audio: bool
    rotation: int = 0
    mirrored: bool = False
    variable_rate: bool = False
    format: str = ""
    codec: str = ""
    audio: AudioPlan | None = None
    stream: VideoStream | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """The sidecar's record of the source (no per-frame lists)."""
        return {
            "path": self.path,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
            "has_audio": self.has_audio,
            "rotation": self.rotation,
            "mirrored": self.mirrored,
            "variable_rate": self.variable_rate,
            "format": self.format,
            "codec": self.codec,
            "audio_codec": self.audio.codec if self.audio is not None else None,
        }


def existing(path: str | Path) -> Path:
    """``path`` if it is a non-empty file, else MediaError ("missing" / "empty")."""
    try:
        return existing_media(path)
    except MediaReadError as err:
        raise MediaError(str(err)) from err


def probe_video(path: str | Path, audio: bool = True) -> SourceVideo:
    """Frame count and times, fps, upright size, rotation and (with ``audio``) the audio plan
    of a video, the audio's trial decode and encode included; MediaError saying why not."""
    path = existing(path)
    try:
        stream = probe_stream(path)
    except VideoReadError as err:
        raise MediaError(str(err)) from err
    audio = plan_audio(path) if audio else AudioPlan(str(path), "none")
    return SourceVideo(
        path=str(path),
        num_frames=stream.num_frames,
        fps=stream.fps,
        height=stream.height,
        width=stream.width,
        has_audio=audio.action != "none",
        rotation=stream.rotation,
        mirrored=stream.mirrored,
        variable_rate=stream.variable_rate,
        format=stream.format,
        codec=stream.codec,
        audio=audio,
        stream=stream,
    )


def read_frames(
    video: SourceVideo | str | Path, indices: list[int], size: tuple[int, int]
) -> torch.Tensor:
    """Frames ``indices`` of a video, upright, at ``size`` (H, W): ``(1, F, 3, H, W)`` in
    [-1, 1]. A path is probed first; MediaError if it cannot be read."""
    source = video if isinstance(video, SourceVideo) else probe_video(video, audio=False)
    try:
        pixels = FrameReader(source.stream, tuple(size)).read(indices)
    except VideoReadError as err:
        raise MediaError(str(err)) from err
    return uint8_to_unit(pixels)[None]


def output_timing(
    source: SourceVideo, indices: list[int], stride: int
) -> tuple[FrameTimes, tuple[float, float], str]:
    """When the kept source frames ``indices`` (every ``stride``-th) show in the output, the
    source seconds they cover (the audio span) and the timing mode.

    Each kept frame lasts until the next kept one; the last one ``stride`` source frames,
    but not past the source's end. A constant-rate source is written at ``fps / stride``
    (``"constant rate"``); a variable-rate one keeps its frames' source times, relative to
    the first kept frame (``"source timestamps"``). The span is
    ``[time of the first kept frame, that + output duration)``, so audio and video last
    the same.
    """
    stream = source.stream
    first, stop = indices[0], min(indices[-1] + stride, source.num_frames)
    if stream.variable_rate:
        pts, base = stream.pts, stream.time_base
        ends = pts[stop] if stop < len(pts) else stream.end_pts
        times = FrameTimes(tuple(pts[i] - pts[first] for i in indices), ends - pts[first], base)
        mode = SOURCE_TIMESTAMPS
    else:  # ticks of one source frame period
        period = 1 / Fraction(source.fps).limit_denominator(100000)
        times = FrameTimes(tuple(i - first for i in indices), stop - first, period)
        mode = CONSTANT_RATE
    start = stream.time_s(first)
    return times, (start, start + times.duration_s), mode


def read_audio(source: SourceVideo, span_s: tuple[float, float]) -> AudioTrack:
    """The source's audio over ``span_s`` seconds, ready to write (copied, transcoded to AAC
    or dropped with the reason; never raises for audio)."""
    if source.audio is None:
        return AudioTrack("none")
    return prepare_audio(source.audio, span_s, frame_s=1 / source.fps)


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
    video = probe_video(path, audio=False)
    _check_size(path, (video.height, video.width), source, size)
    frames = file_frames(path, "mask", video.num_frames, source, indices)
    return (read_frames(video, frames, size).mean(dim=2, keepdim=True) + 1) / 2


def _load_npy(path: Path) -> np.ndarray:
    """A numeric .npy array (no pickles); MediaError otherwise."""
    try:
        return np.load(existing(path), allow_pickle=False)
    except ValueError as err:
        raise MediaError(f"{path}: not a numeric .npy array ({err})") from err


def file_frames(
    path: Path, what: str, count: int, source: SourceVideo, indices: list[int]
) -> list[int]:
    """Which of the ``count`` frames of a ``what`` file (mask, depth, hint) go with the
    edited input frames ``indices``: the same indices when the file has the input's frame
    count, all of them in order when it has exactly the edited frames; MediaError naming
    both counts otherwise."""
    if count == source.num_frames:
        return list(indices)
    if count == len(indices):
        return list(range(count))
    edited = f" or the {len(indices)} edited" if len(indices) != source.num_frames else ""
    raise MediaError(
        f"{what} {path} has {count} frames; it needs the input's {source.num_frames}{edited}"
    )


def read_depth(path, source: SourceVideo, indices: list[int], size) -> torch.Tensor:
    """Depth ``(1, F, 1, H, W)`` from a .npy ``(frames, H, W)``, a grey video or a grey image
    (one depth map for every frame; 16-bit kept exact), near = bright, in [-1, 1] for
    images and videos."""
    path = Path(path)
    if path.suffix == ".npy":
        array = _load_npy(path)
        if array.ndim != 3:
            raise MediaError(f"depth {path} has shape {array.shape}; expected (frames, H, W)")
        frames = file_frames(path, "depth", array.shape[0], source, indices)
        depth = torch.from_numpy(np.asarray(array[frames], dtype=np.float32))[:, None]
        return F.interpolate(depth, size=tuple(size), mode="bilinear")[None]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        levels = torch.from_numpy(read_image(path, "L", exact=True).copy())[None, None]
        depth = F.interpolate(levels * 2 - 1, size=tuple(size), mode="bilinear")
        return depth.expand(len(indices), -1, -1, -1)[None]
    video = probe_video(path, audio=False)
    frames = file_frames(path, "depth", video.num_frames, source, indices)
    return read_frames(video, frames, size).mean(dim=2, keepdim=True)


def read_hint(path, source: SourceVideo, indices: list[int], size) -> torch.Tensor:
    """A ControlNet hint given as a file, ``(1, F, 3, H, W)`` in [0, 1] at ``size``: an image
    (the same hint for every frame), a video, or a .npy of ``(frames, H, W)`` or ``(frames,
    H, W, 3)`` values in [0, 1]; videos and arrays have the input's frame count or exactly
    the edited frames' (``file_frames``)."""
    path = Path(path)
    if path.suffix == ".npy":
        array = _load_npy(path)
        if not (array.ndim == 3 or (array.ndim == 4 and array.shape[-1] == 3)):
            raise MediaError(
                f"hint {path} has shape {array.shape}; expected (frames, H, W) or (frames, H, W, 3)"
            )
        frames = file_frames(path, "hint", array.shape[0], source, indices)
        array = array[frames]
        if array.ndim == 3:
            array = array[..., None].repeat(3, axis=-1)
        hint = torch.from_numpy(np.asarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
        return F.interpolate(hint, size=tuple(size), mode="bilinear").clamp(0, 1)[None]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = torch.from_numpy(read_image(path).copy()).permute(2, 0, 1)[None].float() / 255
        hint = F.interpolate(image, size=tuple(size), mode="bilinear").clamp(0, 1)
        return hint.expand(len(indices), -1, -1, -1)[None]
    video = probe_video(path, audio=False)
    frames = file_frames(path, "hint", video.num_frames, source, indices)
    return (read_frames(video, frames, size) + 1) / 2
