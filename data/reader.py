"""One reader for every video a user or a dataset hands us: probe once, then upright RGB frames.

:func:`probe_stream` opens a file with PyAV, decodes its first frame (to learn the display
rotation and that the codec decodes at all) and, when asked, demuxes the video packets to
learn every frame's presentation time (cheap: no decoding). :class:`FrameReader` then gives
frames by index at a chosen size, upright (the display matrix applied), as uint8 RGB:

- decord where it works and is fast (mp4, mkv, webm, avi, ... without rotation);
- PyAV otherwise: GIF, APNG and whatever else decord cannot open or count like PyAV, and every
  rotated or mirrored video (decord's own rotation handling is partial: it turns some files,
  returns 4-channel frames for others and ignores mirroring).

Frame ``i`` is the ``i``-th frame in presentation order for both backends. Errors are
:class:`VideoReadError` with a ``kind`` callers map to their own messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
from av.sidedata.sidedata import Type as SideDataType
from decord._ffi.base import DECORDError

from data.native_log import first_line, native_stderr_silenced

# Demuxers that open still images or text as a "video" stream.
NOT_VIDEO_FORMATS = {"image2", "tty"}
# Demuxers decord cannot open or mis-counts (GIF: "failed to measure duration/frame-count").
PYAV_ONLY_FORMATS = {"gif", "apng"}
KINDS = ("unreadable", "not_video", "no_frames", "corrupt", "unsupported")


class VideoReadError(Exception):
    """A file that cannot give frames; ``kind`` is one of ``KINDS``, ``detail`` says why."""

    def __init__(self, path: str | Path, kind: str, detail: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        super().__init__(f"{path}: {detail}")
        self.path, self.kind, self.detail = str(path), kind, detail

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.kind, self.detail))


@dataclass(frozen=True)
class VideoStream:
    """What :func:`probe_stream` learns about the first video stream of a file.

    Sizes are the displayed (upright) ones. ``rotation`` is the clockwise turn, in degrees
    (0, 90, 180 or 270), that shows a decoded frame upright, then ``mirrored`` flips it left
    to right. ``pts`` are the frames' presentation times in ``time_base`` seconds, in
    presentation order, on the container's clock (None when not probed or the container has
    none); ``end_pts`` is when the last frame stops showing.
    """

    path: str
    format: str  # demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "gif"
    codec: str
    num_frames: int  # 0: unknown (not probed and not in the container's index)
    fps: float  # average frames per second
    height: int
    width: int
    rotation: int = 0
    mirrored: bool = False
    backend: str = "decord"  # "decord" or "pyav"
    time_base: Fraction = Fraction(1, 1)
    pts: tuple[int, ...] | None = None
    end_pts: int | None = None
    variable_rate: bool = False

    def time_s(self, index: int) -> float:
        """Presentation time (s) of frame ``index`` (``num_frames``: the video's end)."""
        if self.pts is None or self.end_pts is None:
            return index / self.fps
        value = self.end_pts if index >= len(self.pts) else self.pts[index]
        return float(value * self.time_base)


def display_transform(matrix: np.ndarray | None) -> tuple[int, bool]:
    """``(k, mirrored)`` such that ``np.rot90(coded, k)``, then a left-right flip when
    ``mirrored``, shows a frame as its display matrix says.

    ``matrix`` is FFmpeg's 3x3 int32 display matrix (16.16 fixed point; a point (p, q) of the
    coded frame goes to (a p + c q, b p + d q) on screen, y pointing down). Only right-angle
    turns and flips are applied; any other matrix (or None) gives ``(0, False)``.
    """
    if matrix is None:
        return 0, False
    a, b, c, d = (int(np.sign(round(v / 65536))) for v in matrix[:2, :2].ravel())
    if abs(a) + abs(b) != 1 or abs(c) + abs(d) != 1 or a * d - b * c == 0:
        return 0, False
    coded = np.arange(6).reshape(2, 3)  # a tiny asymmetric frame, to see where pixels go
    q, p = np.mgrid[0:2, 0:3]
    x, y = a * p + c * q, b * p + d * q
    shown = np.empty((y.max() - y.min() + 1, x.max() - x.min() + 1), int)
    shown[y - y.min(), x - x.min()] = coded
    for k in range(4):
        for mirrored in (False, True):
            candidate = np.rot90(coded, k)
            candidate = candidate[:, ::-1] if mirrored else candidate
            if candidate.shape == shown.shape and (candidate == shown).all():
                return k, mirrored
    return 0, False  # unreachable for a signed permutation matrix


def _matrix_of(frame: av.VideoFrame) -> np.ndarray | None:
    data = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if data is None:
        return None
    return np.frombuffer(bytes(data), dtype=np.int32).reshape(3, 3)


def is_variable_rate(pts: Sequence[int], time_base: Fraction) -> bool:
    """Whether frame intervals differ by more than timestamp rounding (1.5 ticks) plus 1 %.

    Containers with coarse clocks (WebM's 1 ms) store 30 fps as 33/34 ms steps: constant.
    """
    if len(pts) < 3:
        return False
    steps = np.diff(np.asarray(pts, dtype=np.float64))
    return bool(np.abs(steps - steps.mean()).max() > 1.5 + 0.01 * steps.mean())


def _is_animated_webp(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    # VP8X header flags: bit 1 = animation; an ANIM chunk follows it in animated files.
    return head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def _check_format(path: Path, container: av.container.InputContainer) -> None:
    fmt = container.format.name
    if fmt == "webp_pipe" and _is_animated_webp(path):
        raise VideoReadError(
            path,
            "unsupported",
            "animated WebP cannot be decoded by this FFmpeg build (libavcodec "
            + ".".join(map(str, av.library_versions["libavcodec"]))
            + "); convert it to GIF or mp4",
        )
    if fmt in NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
        raise VideoReadError(path, "not_video", f"not a video (it reads as {fmt!r})")
    if not container.streams.video:
        raise VideoReadError(path, "no_frames", "contains no video frames (no video stream)")


def _scan(
    path: Path, container, stream, timestamps: bool
) -> tuple[av.VideoFrame | None, list[int] | None, int | None, int]:
    """One pass over the video packets: the first decoded frame and, with ``timestamps``,
    the sorted presentation times, when the last frame ends (None when a packet has no
    timestamp: raw elementary streams) and how many packets there were (edit-list cuts too).
    """
    first, pts, ends, demuxed, timed, error = None, [], [], 0, timestamps, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            if first is None:
                try:  # a stream may open with packets that need earlier ones: keep going
                    first = next(iter(stream.decode(packet)), None)
                except av.FFmpegError as err:
                    error = err
            demuxed += 1
            if timed and not packet.is_discard:  # discarded: outside the edit list
                if packet.pts is None:
                    timed = False
                else:
                    pts.append(packet.pts)
                    ends.append(packet.pts + (packet.duration or 0))
            if first is not None and not timestamps:
                break
        if first is None and demuxed:
            first = next(iter(stream.decode(None)), None)  # a decoder that buffers
    except av.FFmpegError as err:  # the container itself breaks off
        raise VideoReadError(path, "corrupt", f"corrupt video stream ({first_line(err)})") from err
    if first is None and error is not None:
        raise VideoReadError(path, "corrupt", f"corrupt video stream ({first_line(error)})")
    if not timed:
        return first, None, None, demuxed
    pts.sort()
    end = max(ends, default=None)
    if pts and end <= pts[-1]:  # no durations stored: one average step
        end = pts[-1] + (round((pts[-1] - pts[0]) / (len(pts) - 1)) if len(pts) > 1 else 1)
    return first, pts, end, demuxed


def _average_fps(stream, pts: list[int] | None, end: int | None) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and rate > 0:
            return float(rate)
    if pts and end is not None and end > pts[0]:
        return len(pts) / float((end - pts[0]) * stream.time_base)
    return 0.0


def probe_stream(path: str | Path, *, timestamps: bool = True) -> VideoStream:
    """Probe the first video stream of ``path`` (an existing, non-empty file).

    With ``timestamps`` every video packet is demuxed (no decoding) for the frame count and
    presentation times, and a file whose packets stop short of its index is corrupt.
    Raises :class:`VideoReadError`: ``unreadable`` (not a media file), ``not_video``
    (an image or text), ``unsupported`` (animated WebP), ``no_frames``, ``corrupt``.
    """
    path = Path(path)
    try:
        with native_stderr_silenced(), av.open(str(path)) as container:
            _check_format(path, container)
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first, pts, end, demuxed = _scan(path, container, stream, timestamps)
            fmt, time_base = container.format.name, stream.time_base
            codec = stream.codec_context.codec.canonical_name
            indexed = stream.frames
            fps = _average_fps(stream, pts, end)
    except av.FFmpegError as err:
        detail = f"not a readable video ({first_line(err)})"
        raise VideoReadError(path, "unreadable", detail) from err
    if first is None or pts == []:
        raise VideoReadError(path, "no_frames", "contains no video frames")
    num_frames = len(pts) if pts is not None else indexed
    # An mp4/mov sample table lists every frame exactly: fewer packets is a cut-off file.
    # (AVI headers can count one frame more than they hold; other indexes are estimates.)
    if timestamps and fmt.startswith("mov,") and indexed > demuxed:
        detail = f"corrupt video stream (the file ends after {demuxed} of {indexed} frames)"
        raise VideoReadError(path, "corrupt", detail)
    k, mirrored = display_transform(_matrix_of(first))
    height, width = (first.width, first.height) if k % 2 else (first.height, first.width)
    if not np.isfinite(fps) or fps <= 0 or height <= 0 or width <= 0:
        raise VideoReadError(path, "corrupt", f"unusable stream ({width}x{height} at {fps} fps)")
    pyav = fmt in PYAV_ONLY_FORMATS or k != 0 or mirrored
    return VideoStream(
        path=str(path),
        format=fmt,
        codec=codec,
        num_frames=num_frames,
        fps=fps,
        height=height,
        width=width,
        rotation=(-90 * k) % 360,
        mirrored=mirrored,
        backend="pyav" if pyav else "decord",
        time_base=time_base or Fraction(1, 1),
        pts=tuple(pts) if pts is not None else None,
        end_pts=end,
        variable_rate=pts is not None and is_variable_rate(pts, time_base),
    )


def upright(pixels: np.ndarray, stream: VideoStream) -> np.ndarray:
    """Decoded frames ``(..., H, W, C)`` turned and flipped as the stream's display matrix
    says (``(..., W, H, C)`` for 90 and 270 degrees)."""
    k = (-stream.rotation // 90) % 4
    turned = np.rot90(pixels, k, axes=(-3, -2))
    return np.ascontiguousarray(turned[..., ::-1, :] if stream.mirrored else turned)


def _coded_size(stream: VideoStream, size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) to decode at so that turning the frames gives ``size``."""
    return (size[1], size[0]) if stream.rotation % 180 else size


def _composite(rgba: np.ndarray, background: int = 255) -> np.ndarray:
    """RGBA uint8 ``(H, W, 4)`` over a uniform grey ``background`` -> RGB ``(H, W, 3)``."""
    alpha = rgba[..., 3:].astype(np.float32) / 255
    mixed = rgba[..., :3] * alpha + background * (1 - alpha)
    return np.round(mixed).astype(np.uint8)


def _has_alpha(frame: av.VideoFrame) -> bool:
    fmt = frame.format
    return fmt.has_palette or any(c.is_alpha for c in fmt.components)


class FrameReader:
    """Upright RGB frames of one probed video at one size, by presentation index.

    ``size`` is the (H, W) of the frames returned (None: the displayed size). Transparent
    frames (GIF, APNG) are composited on white, as images are (``data.images``).
    """

    def __init__(
        self, stream: VideoStream, size: tuple[int, int] | None = None, num_threads: int = 1
    ):
        self.stream = stream
        self.size = tuple(size) if size is not None else (stream.height, stream.width)
        self.num_threads = num_threads
        self._decord = None
        if stream.backend == "decord":
            self._decord = self._open_decord()
        self.backend = "decord" if self._decord is not None else "pyav"
        self.num_frames = len(self._decord) if self._decord is not None else stream.num_frames
        if self.num_frames == 0:  # PyAV without a probed or indexed count: count packets
            self.num_frames = probe_stream(stream.path).num_frames

    def _open_decord(self):
        """decord at the target size, or None when it refuses the file or counts frames
        differently from the probe (PyAV then reads it, with the probe's indices)."""
        height, width = _coded_size(self.stream, self.size)
        try:
            with native_stderr_silenced():
                reader = decord.VideoReader(
                    self.stream.path, width=width, height=height, num_threads=self.num_threads
                )
        except (RuntimeError, DECORDError):
            return None
        if self.stream.num_frames and len(reader) != self.stream.num_frames:
            return None
        return reader

    def __len__(self) -> int:
        return self.num_frames

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` as ``(F, H, W, 3)`` uint8; VideoReadError ``corrupt`` if a frame
        cannot be decoded."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.num_frames for i in indices):
            raise IndexError(f"frame indices {indices} outside [0, {self.num_frames})")
        if self._decord is not None:
            pixels = self._read_decord(indices)
            if pixels is not None:
                return pixels
        return self._read_pyav(indices)

    def _read_decord(self, indices: list[int]) -> np.ndarray | None:
        """decord's frames, or None when it fails: it refuses some output widths (8, 16, 24,
        48, 72 among them: "The size must exactly match") and broken streams alike, so PyAV
        decides which it was."""
        out = np.empty((len(indices), *self.size, 3), np.uint8)
        try:
            with native_stderr_silenced():
                for start in range(0, len(indices), 32):
                    chunk = self._decord.get_batch(indices[start : start + 32]).asnumpy()
                    if chunk.shape[1:] != out.shape[1:]:
                        return None
                    out[start : start + len(chunk)] = chunk
        except (RuntimeError, DECORDError):
            return None
        return out

    def _read_pyav(self, indices: list[int]) -> np.ndarray:
        """Decode from the start up to the last index wanted (sequential: GIF, APNG and phone
        clips are short; seeking would need exact pts-to-index matching)."""
        height, width = _coded_size(self.stream, self.size)
        wanted: dict[int, list[int]] = {}
        for position, index in enumerate(indices):
            wanted.setdefault(index, []).append(position)
        out = np.empty((len(indices), *self.size, 3), np.uint8)
        last, seen = max(indices), 0
        try:
            with native_stderr_silenced(), av.open(self.stream.path) as container:
                video = container.streams.video[0]
                video.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(video)):
                    seen = index + 1
                    if index in wanted:
                        alpha = _has_alpha(frame)
                        image = frame.reformat(
                            width, height, "rgba" if alpha else "rgb24", interpolation="BICUBIC"
                        ).to_ndarray()
                        image = upright(_composite(image) if alpha else image, self.stream)
                        for position in wanted[index]:
                            out[position] = image
                    if index == last:
                        return out
        except av.FFmpegError as err:
            detail = f"corrupt video stream ({first_line(err)})"
            raise VideoReadError(self.stream.path, "corrupt", detail) from err
        detail = f"corrupt video stream (decoded {seen} frames, frame {last} wanted)"
        raise VideoReadError(self.stream.path, "corrupt", detail)
