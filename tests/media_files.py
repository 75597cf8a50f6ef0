"""Tiny media files for tests, written with PyAV (or the imageio-ffmpeg binary where only the
ffmpeg tool can do it: display matrices). Frames carry their index in their brightness and an
asymmetric mark (a bright top-left block), so that a test can see which frame it got and
which way up; audio carries clicks at known times."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

WIDTH, HEIGHT = 64, 48


def level(index: int) -> int:
    """The grey level of frame ``index`` (away from the mark)."""
    return 40 + 8 * index


def indexed_frames(count: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(count, H, W, 3) uint8: grey ``level(i)``, a white 16x16 block at the top left and a
    black 8-pixel bar along the bottom: no turn or flip of it looks the same."""
    frames = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i] = level(i)
    frames[:, :16, :16] = 255
    frames[:, -8:, :] = 0
    return frames


def index_of(frame: np.ndarray) -> int:
    """Invert ``level`` on a decoded upright frame (H, W, 3), read away from the marks."""
    height, width = frame.shape[:2]
    middle = frame[height // 4 : height // 2, width // 2 : width - 4].astype(float).mean()
    return round((middle - 40) / 8)


def clicks(seconds: float, rate: int, every: float = 0.25, first: float = 0.125) -> np.ndarray:
    """Mono float32 audio of ``seconds``: silence with a 2 ms 1 kHz burst at ``first``,
    ``first + every``, ..."""
    samples = np.zeros(round(seconds * rate), np.float32)
    burst = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(round(0.002 * rate)) / rate)
    for t in np.arange(first, seconds, every):
        start = round(t * rate)
        samples[start : start + len(burst)] = burst[: len(samples) - start]
    return samples


def click_times(samples: np.ndarray, rate: int, start_s: float = 0.0) -> list[float]:
    """Onsets (s) of the bursts in mono ``samples``: the first sample of each run above half
    the peak, runs closer than 50 ms merged."""
    loud = np.nonzero(np.abs(samples) > 0.5 * np.abs(samples).max())[0]
    onsets = [int(i) for n, i in enumerate(loud) if n == 0 or i - loud[n - 1] > 0.05 * rate]
    return [start_s + i / rate for i in onsets]


def write_media(
    path: Path,
    frames: np.ndarray,
    *,
    fps: float = 12,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    video_codec: str = "libx264",
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_codec: str = "aac",
    audio_layout: str = "mono",
) -> Path:
    """Write ``frames`` (F, H, W, 3) uint8 with ``video_codec`` at ``fps`` (or at ``pts`` in
    ``time_base`` units: variable rate, no B frames) and mono ``audio`` (float samples)
    encoded with ``audio_codec``; the container follows the suffix."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(video_codec, rate=Fraction(fps).limit_denominator(1000))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        if pts is not None:
            video.time_base = video.codec_context.time_base = time_base
            video.options = {"bf": "0"}
        sound = None
        if audio is not None:
            sound = container.add_stream(audio_codec, rate=audio_rate)
            sound.layout = audio_layout
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            encoder_format = sound.codec_context.codec.audio_formats[0].name
            frame = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = audio_rate, 0, Fraction(1, audio_rate)
            resampler = av.AudioResampler(format=encoder_format, layout=audio_layout)
            for chunk in resampler.resample(frame):
                container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return path


def write_animation(path: Path, frames: np.ndarray, durations_ms: list[int]) -> Path:
    """An animated GIF, APNG (.png) or WebP of ``frames`` (F, H, W, 3) uint8 via Pillow,
    frame ``i`` shown for ``durations_ms[i]``."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=durations_ms, loop=0, lossless=True
    )
    return path


def unknown_audio_codec(path: Path) -> Path:
    """Patch an AVI written with ``pcm_mulaw`` audio in place: its format tag becomes one no
    FFmpeg decoder knows (what odd camera firmware writes)."""
    data = bytearray(path.read_bytes())
    tag = data.find(b"strf", data.find(b"auds")) + 8  # WAVEFORMATEX.wFormatTag
    assert data[tag : tag + 2] == (7).to_bytes(2, "little"), "not a mu-law AVI"
    data[tag : tag + 2] = (0x3A7D).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def ffmpeg(*args: str) -> None:
    """Run the imageio-ffmpeg binary (skips the test without it)."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args]
    subprocess.run(command, check=True)


def with_display_matrix(source: Path, path: Path, rotation: int, hflip: bool = False) -> Path:
    """A stream copy of ``source`` whose display matrix turns it ``rotation`` degrees
    counterclockwise (ffmpeg's ``-display_rotation``), then flips it when ``hflip``."""
    flip = ["-display_hflip"] if hflip else []
    ffmpeg("-display_rotation", str(rotation), *flip, "-i", str(source), "-c", "copy", str(path))
    return path


def audio_of(path: Path) -> tuple[np.ndarray, int, float, float]:
    """(mono samples from time 0, rate, first sample time, end time from the container's
    packets: last pts + duration, which is what players show) of ``path``'s audio."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        end = float((packets[-1].pts + packets[-1].duration) * stream.time_base)
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        frames = list(container.decode(stream))
        samples = np.concatenate([f.to_ndarray().reshape(-1, f.samples)[0] for f in frames])
        return samples.astype(np.float32), stream.rate, float(frames[0].time), end


def video_times(path: Path) -> tuple[list[float], float]:
    """(presentation times of the frames in s, when the last one ends) from the packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.duration) for p in container.demux(stream) if p.size)
        base = stream.time_base
    return [float(p * base) for p, _ in packets], float(sum(packets[-1]) * base)
