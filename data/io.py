"""Writing videos: H.264 mp4 through PyAV, at a constant rate or at given frame times, with
audio prepared by :func:`data.audio.prepare_audio`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from data.audio import AudioTrack


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(F, 3, H, W) float tensor in [-1, 1] -> (F, H, W, 3) uint8; uint8 (F, H, W, 3) passes."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (F, H, W, 3), got {frames.shape}")
        return frames
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"float frames must be (F, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
    pixels = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def rate_fraction(fps: float) -> Fraction:
    """``fps`` as an exact-enough fraction (29.97 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(100000)


@dataclass(frozen=True)
class FrameTimes:
    """When each written frame shows: ``pts[i] * time_base`` seconds from the first frame
    (``pts[0] == 0``, strictly increasing) until the next, the last until ``end``."""

    pts: tuple[int, ...]
    end: int
    time_base: Fraction

    def __post_init__(self) -> None:
        steps = np.diff([*self.pts, self.end])
        if not self.pts or self.pts[0] != 0 or (steps <= 0).any():
            raise ValueError(f"frame times must start at 0 and increase, got {self}")

    @classmethod
    def constant(cls, num_frames: int, fps: float) -> FrameTimes:
        """``num_frames`` frames ``1 / fps`` s apart, the last shown for ``1 / fps`` too."""
        if num_frames < 1 or fps <= 0:
            raise ValueError(f"bad constant timing: {num_frames} frames at {fps} fps")
        return cls(tuple(range(num_frames)), num_frames, 1 / rate_fraction(fps))

    @property
    def duration_s(self) -> float:
        """Seconds from the first frame to the end of the last."""
        return float(self.end * self.time_base)

    @property
    def constant_rate(self) -> bool:
        """Whether the frames are evenly spaced (the last may end early)."""
        return len(set(np.diff(self.pts).tolist())) <= 1

    def nominal_rate(self) -> Fraction:
        """Frames per second: one over the step of evenly spaced frames, else the average."""
        if self.constant_rate and len(self.pts) > 1:
            return 1 / ((self.pts[1] - self.pts[0]) * self.time_base)
        return rate_fraction(len(self.pts) / self.duration_s)


def write_video(
    path: str | Path,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    *,
    crf: int = 18,
    times: FrameTimes | None = None,
    audio: AudioTrack | None = None,
) -> Path:
    """Encode frames as H.264 (yuv420p) mp4; mux ``audio`` (its data, if any) beside them.

    ``frames`` is (F, 3, H, W) float in [-1, 1] or (F, H, W, 3) uint8; H and W must be even
    (yuv420p). Frames show at ``times`` when given (per-frame timestamps: variable rate; B
    frames are then off, since x264's B-frame decode times would end the mp4 track before
    its last frame), else at a constant ``fps``. Raises ValueError for bad frames or times.
    """
    pixels = frames_to_uint8(frames)
    num_frames, height, width, _ = pixels.shape
    if num_frames == 0:
        raise ValueError(f"no frames to write to {path}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps} for {path}")
    times = times if times is not None else FrameTimes.constant(num_frames, fps)
    if len(times.pts) != num_frames:
        raise ValueError(f"{len(times.pts)} frame times for {num_frames} frames ({path})")
    with VideoWriter(path, (height, width), times, crf=crf, audio=audio) as writer:
        writer.write(pixels)
    return path


class VideoWriter:
    """An H.264 (yuv420p) mp4 written a few frames at a time (``write``), so a long video
    never sits in memory whole; ``audio`` is muxed when it closes. As a context manager it
    closes on success; ``close`` raises ``ValueError`` if fewer frames came than ``times``
    holds. ``size`` (H, W) must be even; ``times`` says when each frame shows
    (``write_video``'s rules)."""

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        times: FrameTimes,
        *,
        crf: int = 18,
        audio: AudioTrack | None = None,
    ) -> None:
        height, width = size
        if height % 2 or width % 2:
            raise ValueError(f"H.264 needs even frame sizes, got {height}x{width} for {path}")
        self.path, self.size, self.times, self.written = Path(path), (height, width), times, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.durations = dict(
            zip(times.pts, np.diff([*times.pts, times.end]).tolist(), strict=True)
        )
        self.sound = av.open(io.BytesIO(audio.data)) if audio is not None and audio.data else None
        self.container = av.open(str(self.path), mode="w")
        stream = self.container.add_stream("libx264", rate=times.nominal_rate())
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = times.time_base
        stream.options = {"crf": str(crf), **({} if times.constant_rate else {"bf": "0"})}
        self.stream = stream
        # Every stream is added before the first packet: that writes the header.
        self.sound_out = self.sound and self.container.add_stream_from_template(
            self.sound.streams.audio[0]
        )

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode the next frames ((n, 3, H, W) in [-1, 1] or (n, H, W, 3) uint8)."""
        pixels = frames_to_uint8(frames)
        if tuple(pixels.shape[1:3]) != self.size:
            raise ValueError(f"frames of {pixels.shape[1:3]} for a {self.size} video ({self.path})")
        if self.written + len(pixels) > len(self.times.pts):
            raise ValueError(f"more frames than the {len(self.times.pts)} times of {self.path}")
        pts = self.times.pts[self.written : self.written + len(pixels)]
        for image, stamp in zip(pixels, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = stamp, self.times.time_base
            self._mux(self.stream.encode(frame))
        self.written += len(pixels)

    def _mux(self, packets: Sequence[av.Packet]) -> None:
        """Every packet gets its frame's duration (the muxer keeps only the last one's, which
        sets where the video ends)."""
        for packet in packets:
            packet.duration = self.durations[packet.pts]
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, mux the audio and close the file."""
        try:
            if self.written != len(self.times.pts):
                raise ValueError(
                    f"{self.written} frames written for {len(self.times.pts)} frame times "
                    f"({self.path})"
                )
            self._mux(self.stream.encode(None))
            if self.sound is not None:
                for packet in self.sound.demux(self.sound.streams.audio[0]):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    packet.stream = self.sound_out
                    self.container.mux(packet)
        finally:
            self.container.close()
            if self.sound is not None:
                self.sound.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:  # an error on the way: close the file without flushing; it is not kept
            self.container.close()
            if self.sound is not None:
                self.sound.close()
