"""Audio in the edited mp4: exactly the kept frames' span, in sync, as AAC whatever the source
codec, or dropped with a reason decided before any compute; frames at their source times
when the source's rate varies. Each test writes what infer.py writes (output_timing,
read_audio, write_video) from the source frames, without a model."""

from fractions import Fraction

import av
import numpy as np
import pytest

from data.audio import plan_audio, prepare_audio
from data.io import FrameTimes, write_video
from data.media import output_timing, probe_video, read_audio, read_frames
from tests.media_files import (
    audio_of,
    click_times,
    clicks,
    index_of,
    indexed_frames,
    unknown_audio_codec,
    video_times,
    write_media,
)

FPS = 12
SECONDS = 2.0


def kept(start=0, end=None, max_frames=None, stride=1, total=24):
    """infer.py's frame choice: ``start, start + stride, ...`` before ``end``."""
    return list(range(start, total if end is None else end, stride))[:max_frames]


def edit(source_path, indices, stride, out):
    """Write the kept source frames as infer.py writes an edit; (sidecar-like facts)."""
    source = probe_video(source_path)
    times, span, timing = output_timing(source, indices, stride)
    audio = read_audio(source, span)
    frames = read_frames(source, indices, (48, 64))[0]
    write_video(out, frames, source.fps / stride, times=times, audio=audio)
    return source, times, span, timing, audio


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """24 frames at 12 fps (2 s) with AAC audio clicking every 0.25 s from 0.125 s."""
    folder = tmp_path_factory.mktemp("audio")
    return write_media(
        folder / "clip.mp4", indexed_frames(24), fps=FPS, audio=clicks(SECONDS, 16000)
    )


@pytest.mark.parametrize(
    "choice",
    [
        {},
        {"end": 8},
        {"max_frames": 8},
        {"start": 5},
        {"start": 3, "end": 20, "stride": 3},
        {"start": 2, "max_frames": 4, "stride": 2},
        {"start": 7, "stride": 5},  # the last frame's stride runs past the source's end
    ],
)
def test_audio_is_the_kept_span_in_sync(clip, tmp_path, choice):
    stride = choice.get("stride", 1)
    indices = kept(**choice)
    out = tmp_path / "out.mp4"
    _, times, span, timing, audio = edit(clip, indices, stride, out)
    assert timing == "constant rate"
    assert span[0] == pytest.approx(indices[0] / FPS)
    assert span[1] == pytest.approx(min(indices[-1] + stride, 24) / FPS)
    assert audio.description == ("copied" if not choice else "transcoded to aac from aac")
    frame_times, video_end = video_times(out)
    assert frame_times == pytest.approx([(i - indices[0]) / FPS for i in indices], abs=1e-3)
    samples, rate, audio_start, audio_end = audio_of(out)
    assert audio_start == 0 and abs(audio_end - video_end) <= 1 / FPS
    assert video_end == pytest.approx(span[1] - span[0], abs=1e-3)
    expected = [t - span[0] for t in click_times(clicks(SECONDS, 16000), 16000)]
    expected = [t for t in expected if 0.005 < t < span[1] - span[0] - 0.005]
    assert click_times(samples, rate) == pytest.approx(expected, abs=0.003)


CODECS = {
    "mu-law in avi": ("avi", "mpeg4", "pcm_mulaw", 8000),
    "a-law in avi": ("avi", "mpeg4", "pcm_alaw", 8000),
    "ima adpcm in avi": ("avi", "mpeg4", "adpcm_ima_wav", 16000),
    "unsigned 8-bit pcm in avi": ("avi", "mpeg4", "pcm_u8", 11025),
    "vorbis in webm": ("webm", "libvpx", "libvorbis", 48000),
    "opus in mkv": ("mkv", "libx264", "libopus", 48000),
    "16-bit pcm in mov": ("mov", "libx264", "pcm_s16le", 16000),
    "24-bit pcm in mkv": ("mkv", "libx264", "pcm_s24le", 44100),
    "float pcm in mov": ("mov", "libx264", "pcm_f32le", 16000),
    "flac in mkv": ("mkv", "libx264", "flac", 22050),
    "mp3 in avi": ("avi", "mpeg4", "libmp3lame", 44100),
}


@pytest.mark.parametrize("case", list(CODECS))
def test_every_audio_codec_ends_up_aac_in_sync(tmp_path, case):
    suffix, video_codec, audio_codec, rate = CODECS[case]
    source = write_media(
        tmp_path / f"in.{suffix}",
        indexed_frames(24),
        video_codec=video_codec,
        audio=clicks(SECONDS, rate),
        audio_rate=rate,
        audio_codec=audio_codec,
    )
    plan = plan_audio(source)
    codec = plan.codec
    assert plan.action == ("copy" if codec == "mp3" else "aac"), plan
    for indices in (kept(), kept(start=6, end=18)):
        out = tmp_path / f"out{indices[0]}.mp4"
        _, _, span, _, audio = edit(source, indices, 1, out)
        if codec == "mp3" and indices[0] == 0:
            assert audio.description == "copied"  # mp3 plays everywhere in an mp4
        else:
            assert audio.description == f"transcoded to aac from {codec}"
        with av.open(str(out)) as container:
            assert container.streams.audio[0].codec_context.name in ("aac", "mp3float")
        samples, out_rate, audio_start, audio_end = audio_of(out)
        _, video_end = video_times(out)
        assert abs(audio_end - video_end) <= 1 / FPS and audio_start == 0
        expected = [t - span[0] for t in click_times(clicks(SECONDS, rate), rate)]
        expected = [t for t in expected if 0.01 < t < span[1] - span[0] - 0.01]
        found = click_times(samples, out_rate)
        # Lossy codecs smear a click by a few ms (mp3 copies add their decoder delay).
        assert found == pytest.approx(expected, abs=0.03 if codec == "mp3" else 0.006)


def undecodable(tmp_path):
    """A mu-law AVI whose audio format tag is one no FFmpeg decoder knows."""
    path = write_media(
        tmp_path / "camera.avi",
        indexed_frames(24),
        video_codec="mpeg4",
        audio=clicks(SECONDS, 8000),
        audio_rate=8000,
        audio_codec="pcm_mulaw",
    )
    return unknown_audio_codec(path)


def garbled(tmp_path):
    """An mp4 whose AAC packets are random bytes."""
    path = write_media(tmp_path / "garbled.mp4", indexed_frames(24), audio=clicks(SECONDS, 16000))
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as container:
        for packet in container.demux(container.streams.audio[0]):
            if packet.size and packet.pos is not None and packet.pos > 0:
                noise = np.random.default_rng(packet.pos).bytes(packet.size)
                data[packet.pos : packet.pos + packet.size] = noise
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make, words", [(undecodable, "no decoder"), (garbled, "decoded")])
def test_audio_that_cannot_be_decoded_is_dropped_with_a_reason(tmp_path, make, words):
    source = probe_video(make(tmp_path))  # planned at probe time: before any compute
    assert source.audio.action == "drop" and words in source.audio.reason
    out = tmp_path / "out.mp4"
    _, _, _, _, audio = edit(source.path, kept(end=10), 1, out)
    assert audio.description == f"dropped: {source.audio.reason}" and audio.data is None
    with av.open(str(out)) as container:
        assert not container.streams.audio and container.streams.video[0].frames == 10


def test_variable_rate_frames_keep_their_source_times_and_audio_stays_in_sync(tmp_path):
    """10 frames 1/30 s apart, then 10 frames 0.2 s apart (the field case's pattern)."""
    base = Fraction(1, 90000)
    pts = [3000 * i for i in range(10)] + [30000 + 18000 * i for i in range(10)]
    seconds = (pts[-1] + 18000) / 90000
    source_path = write_media(
        tmp_path / "vfr.mp4",
        indexed_frames(20),
        pts=pts,
        time_base=base,
        audio=clicks(seconds + 0.2, 16000),  # the audio runs on past the last frame
    )
    for indices in (kept(total=20), kept(start=4, end=17, total=20)):
        out = tmp_path / f"out{indices[0]}.mp4"
        source, times, span, timing, _ = edit(source_path, indices, 1, out)
        assert source.variable_rate and timing == "source timestamps"
        frame_times, video_end = video_times(out)
        expected = [(pts[i] - pts[indices[0]]) / 90000 for i in indices]
        assert frame_times == pytest.approx(expected, abs=1e-6)  # not a constant grid
        with av.open(str(out)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert [index_of(f) for f in decoded] == indices
        samples, rate, _, audio_end = audio_of(out)
        assert abs(audio_end - video_end) <= 1 / 30
        wanted = [t - span[0] for t in click_times(clicks(seconds + 0.2, 16000), 16000)]
        wanted = [t for t in wanted if 0.005 < t < span[1] - span[0] - 0.005]
        assert click_times(samples, rate) == pytest.approx(wanted, abs=0.003)


def test_frame_times_are_checked():
    with pytest.raises(ValueError, match="start at 0 and increase"):
        FrameTimes((0, 3, 3), 5, Fraction(1, 30))
    with pytest.raises(ValueError, match="start at 0 and increase"):
        FrameTimes((1, 3), 5, Fraction(1, 30))
    assert FrameTimes.constant(3, 12.5).duration_s == pytest.approx(0.24)


def test_a_span_past_the_audio_drops_it_with_the_reason(clip):
    plan = plan_audio(clip)
    track = prepare_audio(plan, (SECONDS + 1, SECONDS + 2), frame_s=1 / FPS)
    assert track.description.startswith("dropped:") and "ends before" in track.description
