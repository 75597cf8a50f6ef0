"""The audio of an edited video: planned when the source is probed, cut and encoded before any
compute, muxed by :func:`data.io.write_video`.

An mp4 gets AAC: audio that already is AAC or MP3 (what every player takes in an mp4) is
copied when the kept span is the whole stream; anything else FFmpeg decodes (Vorbis, Opus,
PCM of every flavour, mu-law/A-law, ADPCM, FLAC, AC-3, ...) and any cut is transcoded to
AAC, sample-exact. Audio that cannot be decoded or encoded is dropped with the reason. Every
failure is found by :func:`plan_audio` (a trial decode and encode) or
:func:`prepare_audio`, both run before the edit, so writing the result cannot fail on audio.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from data.native_log import first_line, native_stderr_silenced

# Audio copied into an mp4 as is: what browsers, QuickTime and phones all play there.
COPYABLE = {"aac", "mp3"}
AAC_RATES = sorted(av.codec.Codec("aac", "w").audio_rates)
# Layouts for channel counts whose source layout is unnamed ("1 channels", as in G.711 AVI).
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1"}
DEFAULT_LAYOUTS[8] = "7.1"  # FFmpeg's AAC encoder: mono to 7.1
# A span edge within this of the stream's own edge counts as the same instant.
SAME_INSTANT_S = 0.001


@dataclass(frozen=True)
class AudioPlan:
    """What happens to a file's audio in an mp4, decided when the file is probed.

    ``action``: ``"copy"`` (AAC or MP3, copied when the span allows, else cut as AAC),
    ``"aac"`` (transcoded), ``"drop"`` (``reason`` says why) or ``"none"`` (no audio).
    ``start_s``/``end_s``: the stream's first and last sample times (seconds, container
    clock).
    """

    path: str
    action: str
    codec: str | None = None
    reason: str = ""
    start_s: float = 0.0
    end_s: float = 0.0
    sample_rate: int = 0
    layout: str = ""


@dataclass(frozen=True)
class AudioTrack:
    """Audio ready to mux: ``data`` is an in-memory mp4 holding one AAC or MP3 stream whose
    time 0 is the source time ``span_s[0]`` (None: nothing to mux). ``description`` is one of
    ``"copied"``, ``"transcoded to aac from <codec>"``, ``"dropped: <reason>"``, ``"none"``."""

    description: str
    span_s: tuple[float, float] | None = None
    data: bytes | None = None
    duration_s: float = 0.0


def aac_format(sample_rate: int, layout: str) -> tuple[int, str]:
    """(rate, layout) the AAC encoder takes for a source of ``sample_rate`` Hz and channel
    ``layout``: the nearest supported rate at or above it (96 kHz at most); the layout when
    it is a named one of at most 8 channels, else the channel count's usual layout (stereo,
    a downmix, above 8)."""
    rate = next((r for r in AAC_RATES if r >= sample_rate), AAC_RATES[-1])
    channels = av.AudioLayout(layout).nb_channels
    if channels > len(DEFAULT_LAYOUTS):
        return rate, "stereo"
    return rate, DEFAULT_LAYOUTS[channels] if "channels" in layout else layout


def _aac_encoder(rate: int, layout: str) -> av.AudioCodecContext:
    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate, encoder.layout, encoder.format = rate, layout, "fltp"
    encoder.time_base = Fraction(1, rate)
    return encoder


def _codec_name(stream) -> str:
    context = stream.codec_context
    return context.codec.canonical_name if context is not None else "unknown"


def plan_audio(path: str | Path) -> AudioPlan:
    """The audio plan of ``path``'s first audio stream, after a trial: its first frame is
    decoded and encoded as AAC, and its packets are demuxed for its end time. Never raises
    for audio: a stream that fails is planned ``"drop"`` with the reason."""
    path = str(path)
    try:
        with native_stderr_silenced(), av.open(path) as container:
            if not container.streams.audio:
                return AudioPlan(path, "none")
            stream = container.streams.audio[0]
            if stream.codec_context is None:
                reason = "its codec is unknown to FFmpeg (no decoder)"
                return AudioPlan(path, "drop", "unknown", reason)
            codec = _codec_name(stream)
            try:
                return _trial(path, container, stream, codec)
            except (av.FFmpegError, ValueError) as err:
                reason = f"{codec} audio could not be decoded or encoded ({first_line(err)})"
                return AudioPlan(path, "drop", codec, reason)
    except av.FFmpegError as err:
        return AudioPlan(path, "drop", None, f"the audio could not be read ({first_line(err)})")


def _trial(path: str, container, stream, codec: str) -> AudioPlan:
    """Decode the first frame, encode it as AAC, demux every packet for the end time."""
    first, end, time_base = None, 0, stream.time_base
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if first is None:
            first = next(iter(stream.decode(packet)), None)
        if packet.pts is not None:
            end = max(end, packet.pts + (packet.duration or 0))
    if first is None:
        return AudioPlan(path, "drop", codec, f"the {codec} stream has no decodable audio")
    rate, layout = aac_format(first.sample_rate, first.layout.name)
    encoder = _aac_encoder(rate, layout)
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    for frame in resampler.resample(first):
        frame.pts = None
        encoder.encode(frame)
    start_s = float(first.time or 0.0)
    end_s = float(end * time_base) if end and time_base else start_s
    return AudioPlan(
        path,
        "copy" if codec in COPYABLE else "aac",
        codec,
        start_s=start_s,
        end_s=max(end_s, start_s + first.samples / first.sample_rate),
        sample_rate=first.sample_rate,
        layout=first.layout.name,
    )


def describe_plan(plan: AudioPlan) -> str:
    """What the plan does, in the words of a sidecar (the span may still turn a copy into
    a transcode: :func:`prepare_audio`)."""
    if plan.action == "none":
        return "none"
    if plan.action == "drop":
        return f"dropped: {plan.reason}"
    return "copied" if plan.action == "copy" else f"transcoded to aac from {plan.codec}"


def prepare_audio(plan: AudioPlan, span_s: tuple[float, float], frame_s: float) -> AudioTrack:
    """The audio of source seconds ``[span_s[0], span_s[1])``, re-timed to start at 0.

    Copied (AAC/MP3 planned ``"copy"``) when the span starts where the stream starts and the
    stream ends at most ``frame_s`` (one source frame) after the span; otherwise decoded,
    cut sample-exact (silence before a late-starting stream keeps it in sync) and encoded as
    AAC. A failure drops the audio with the reason; this function does not raise for it.
    """
    if plan.action in ("none", "drop"):
        return AudioTrack(describe_plan(plan))
    start, end = span_s
    if end <= start:
        raise ValueError(f"audio span must be increasing, got {span_s}")
    if plan.end_s <= start:
        return AudioTrack(f"dropped: the {plan.codec} stream ends before the kept span")
    whole = abs(plan.start_s - start) <= SAME_INSTANT_S and plan.end_s <= end + frame_s
    if plan.action == "copy" and whole:
        try:
            with native_stderr_silenced():
                data, duration = _copy(plan, start), plan.end_s - plan.start_s
            return AudioTrack("copied", (start, min(end, plan.end_s)), data, duration)
        except (av.FFmpegError, ValueError):
            pass  # a stream the mp4 muxer refuses as is: transcoded below
    try:
        with native_stderr_silenced():
            data, duration = _transcode(plan, start, end)
    except (av.FFmpegError, ValueError) as err:
        reason = f"{plan.codec} audio failed while cutting ({first_line(err)})"
        return AudioTrack(f"dropped: {reason}")
    if duration == 0:
        return AudioTrack(f"dropped: the {plan.codec} stream has no audio in the kept span")
    description = f"transcoded to aac from {plan.codec}"
    return AudioTrack(description, (start, start + duration), data, duration)


def _copy(plan: AudioPlan, start: float) -> bytes:
    """The whole stream's packets in an mp4, timestamps moved so that ``start`` is 0."""
    buffer = io.BytesIO()
    with av.open(plan.path) as source, av.open(buffer, "w", format="mp4") as out:
        stream = source.streams.audio[0]
        target = out.add_stream_from_template(stream)
        shift = round(start / stream.time_base)
        for packet in source.demux(stream):
            if packet.dts is None:  # the demuxer's final flush packet
                continue
            pts = packet.dts if packet.pts is None else packet.pts
            packet.pts, packet.dts = pts - shift, packet.dts - shift
            packet.stream = target
            out.mux(packet)
    return buffer.getvalue()


def _transcode(plan: AudioPlan, start: float, end: float) -> tuple[bytes, float]:
    """AAC of the source samples in ``[start, end)`` seconds; (mp4 bytes, duration s)."""
    rate, layout = aac_format(plan.sample_rate, plan.layout)
    first_wanted, last_wanted = round(start * rate), round(end * rate)  # output sample clock
    buffer = io.BytesIO()
    written = 0
    with av.open(plan.path) as source, av.open(buffer, "w", format="mp4") as out:
        stream = source.streams.audio[0]
        target = out.add_stream("aac", rate=rate)
        target.layout = layout
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        channels = av.AudioLayout(layout).nb_channels
        position = None  # output-rate sample index of the next resampled sample

        def emit(samples: np.ndarray) -> None:
            nonlocal written
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples, np.float32), format="fltp", layout=layout
            )
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), written
            written += samples.shape[1]
            for packet in target.encode(frame):
                out.mux(packet)

        for decoded in itertools.chain(source.decode(stream), [None]):
            if position is None and decoded is not None:  # contiguous from here on
                position = round(float(decoded.time or 0.0) * rate)
                if position > first_wanted:  # a late stream: silence keeps it in sync
                    emit(np.zeros((channels, min(position, last_wanted) - first_wanted)))
            for frame in resampler.resample(decoded):
                samples = frame.to_ndarray()
                lo = max(0, first_wanted - position)
                hi = min(samples.shape[1], last_wanted - position)
                if hi > lo:
                    emit(samples[:, lo:hi])
                position += samples.shape[1]
            if position is not None and position >= last_wanted:
                break
        if written:
            for packet in target.encode(None):
                out.mux(packet)
    return buffer.getvalue(), written / rate
