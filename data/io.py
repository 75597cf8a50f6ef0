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
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width} for {path}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps} for {path}")
    times = times if times is not None else FrameTimes.constant(num_frames, fps)
    if len(times.pts) != num_frames:
        raise ValueError(f"{len(times.pts)} frame times for {num_frames} frames ({path})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sound = av.open(io.BytesIO(audio.data)) if audio is not None and audio.data else None
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=times.nominal_rate())
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = stream.codec_context.time_base = times.time_base
            stream.options = {"crf": str(crf), **({} if times.constant_rate else {"bf": "0"})}
            # Every stream is added before the first packet: that writes the header.
            sound_out = sound and container.add_stream_from_template(sound.streams.audio[0])
            _mux_frames(container, stream, pixels, times)
            if sound is not None:
                for packet in sound.demux(sound.streams.audio[0]):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    packet.stream = sound_out
                    container.mux(packet)
    finally:
        if sound is not None:
            sound.close()
    return path


def _mux_frames(container, stream, pixels: np.ndarray, times: FrameTimes) -> None:
    """Encode with each frame's pts; every packet gets its frame's duration (the muxer keeps
    only the last one's, which sets where the video ends)."""
    durations = dict(zip(times.pts, np.diff([*times.pts, times.end]).tolist(), strict=True))

    def mux(packets: Sequence[av.Packet]) -> None:
        for packet in packets:
            packet.duration = durations[packet.pts]
            container.mux(packet)

    for image, pts in zip(pixels, times.pts, strict=True):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, times.time_base
        mux(stream.encode(frame))
    mux(stream.encode(None))
