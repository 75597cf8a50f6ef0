"""Writing videos: H.264 mp4 through PyAV, optionally with the audio of a source file."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


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


def write_video(
    path: str | Path,
    frames: torch.Tensor | np.ndarray,
    fps: float,
    *,
    crf: int = 18,
    audio_from: str | Path | None = None,
) -> Path:
    """Encode frames as H.264 (yuv420p) mp4 at ``fps``; copy the audio of ``audio_from``.

    ``frames`` is (F, 3, H, W) float in [-1, 1] or (F, H, W, 3) uint8; H and W must be even
    (yuv420p). The audio stream, if the source has one, is copied without re-encoding.
    """
    pixels = frames_to_uint8(frames)
    num_frames, height, width, _ = pixels.shape
    if num_frames == 0:
        raise ValueError(f"no frames to write to {path}")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width} for {path}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = av.open(str(audio_from)) if audio_from is not None else None
    try:
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            audio_in = source.streams.audio[0] if source and source.streams.audio else None
            audio_out = container.add_stream_from_template(audio_in) if audio_in else None
            for image in pixels:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
            if audio_in is not None:
                for packet in source.demux(audio_in):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    packet.stream = audio_out
                    container.mux(packet)
    finally:
        if source is not None:
            source.close()
    return path
