"""The one video reader: display rotation (as ffmpeg shows it), PyAV for what decord cannot
read (GIF, APNG, widths decord refuses), per-frame times, and errors only for real faults."""

from fractions import Fraction

import av
import numpy as np
import pytest

from data.reader import (
    FrameReader,
    VideoReadError,
    display_transform,
    is_variable_rate,
    probe_stream,
)
from data.video import MediaReadError, read_clip
from tests.media_files import (
    ffmpeg,
    index_of,
    indexed_frames,
    with_display_matrix,
    write_animation,
    write_media,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 6-frame 64x48 H.264 clip of indexed frames (white block top left)."""
    return write_media(tmp_path_factory.mktemp("reader") / "base.mp4", indexed_frames(6))


@pytest.mark.parametrize("rotation, hflip", [(90, False), (180, False), (-90, False), (90, True)])
def test_display_matrix_is_applied_as_ffmpeg_shows_it(base, tmp_path, rotation, hflip):
    """ffmpeg's own autorotation (a lossless re-encode) is the reference picture."""
    rotated = with_display_matrix(base, tmp_path / "rotated.mp4", rotation, hflip)
    shown = tmp_path / "shown.mp4"
    ffmpeg("-i", str(rotated), "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(shown))
    with av.open(str(shown)) as container:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    stream = probe_stream(rotated)
    assert stream.backend == "pyav" and stream.mirrored == hflip
    assert (stream.height, stream.width) == reference.shape[1:3]
    assert stream.rotation == (-rotation) % 360  # ffmpeg's angle is counterclockwise
    frames = FrameReader(stream).read(range(6))
    assert np.array_equal(frames, reference)


def test_a_phone_portrait_video_reads_upright_for_inference_and_training(base, tmp_path):
    """Phones store portrait video landscape with a 90-degree clockwise display turn."""
    phone = with_display_matrix(base, tmp_path / "phone.mp4", -90)
    stream = probe_stream(phone)
    assert (stream.height, stream.width, stream.rotation) == (64, 48, 90)
    frames = FrameReader(stream, (32, 24)).read([4, 1])
    assert frames.shape == (2, 32, 24, 3) and [index_of(f) for f in frames] == [4, 1]
    assert frames[0, :6, -6:].mean() > 240 and frames[0, :6, :6].mean() < 200  # block: top right
    clip = read_clip(phone, 2, (64, 48), stride=2)
    pixels = ((clip.frames + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert clip.frames.shape == (2, 3, 64, 48) and pixels[0, :8, -8:].mean() > 240


def test_display_transform_covers_turns_and_flips():
    one = 65536
    assert display_transform(None) == (0, False)
    assert display_transform(np.array([[one, 0, 0], [0, one, 0], [0, 0, 1 << 30]])) == (0, False)
    assert display_transform(np.array([[0, one, 0], [-one, 0, 0], [0, 0, 1 << 30]])) == (3, False)
    assert display_transform(np.array([[-one, 0, 0], [0, one, 0], [0, 0, 1 << 30]])) == (0, True)
    tilted = np.array([[46341, 46341, 0], [-46341, 46341, 0], [0, 0, 1 << 30]])  # 45 degrees
    assert display_transform(tilted) == (0, False)


def test_gif_and_apng_are_read_with_their_own_frame_times(tmp_path):
    frames = indexed_frames(5)
    durations = [100, 100, 300, 100, 200]
    for path in (tmp_path / "anim.gif", tmp_path / "anim.png"):
        stream = probe_stream(write_animation(path, frames, durations))
        assert stream.backend == "pyav" and stream.num_frames == 5
        times = [stream.time_s(i) for i in range(6)]
        assert times == pytest.approx([0, 0.1, 0.2, 0.5, 0.6, 0.8])
        assert stream.variable_rate
        pixels = FrameReader(stream).read([3, 0, 4])
        assert [index_of(f) for f in pixels] == [3, 0, 4]
        assert np.abs(pixels.astype(int) - frames[[3, 0, 4]]).max() <= 2  # palette exact


def test_transparent_frames_are_composited_on_white(tmp_path):
    """An APNG whose clear pixels hold red under zero alpha: they read white, not red."""
    from PIL import Image

    frames = np.zeros((2, 16, 16, 4), np.uint8)
    frames[..., 0] = 255  # red everywhere, but only the opaque bar shows
    frames[0, :4, :4] = frames[1, :4, :8] = (0, 0, 0, 255)
    images = [Image.fromarray(f) for f in frames]
    path = tmp_path / "clear.png"
    images[0].save(path, save_all=True, append_images=images[1:], duration=100)
    pixels = FrameReader(probe_stream(path)).read([0, 1])
    assert (pixels[:, 4:] == 255).all()  # white, not the red under the clear pixels
    assert (pixels[0, :4, :4] == 0).all() and (pixels[1, :4, :8] == 0).all()


def test_animated_webp_is_refused_in_one_clear_line(tmp_path):
    path = write_animation(tmp_path / "anim.webp", indexed_frames(3), [100] * 3)
    with pytest.raises(VideoReadError) as caught:
        probe_stream(path)
    assert caught.value.kind == "unsupported"
    assert "animated WebP cannot be decoded by this FFmpeg build" in str(caught.value)
    write_animation(tmp_path / "still.webp", indexed_frames(1), [100])
    with pytest.raises(VideoReadError, match="not a video"):
        probe_stream(tmp_path / "still.webp")


def test_variable_rate_is_told_from_rounding_jitter(tmp_path):
    assert not is_variable_rate([0, 33, 67, 100, 133, 167], Fraction(1, 1000))  # WebM 30 fps
    assert is_variable_rate([0, 33, 67, 100, 300, 500], Fraction(1, 1000))
    pts = [0, 3000, 6000, 9000, 27000, 45000]
    path = write_media(
        tmp_path / "vfr.mp4", indexed_frames(6), pts=pts, time_base=Fraction(1, 90000)
    )
    stream = probe_stream(path)
    assert stream.variable_rate and stream.pts == tuple(pts) and stream.end_pts > pts[-1]
    assert [index_of(f) for f in FrameReader(stream).read(range(6))] == list(range(6))
    assert not probe_stream(write_media(tmp_path / "cfr.mp4", indexed_frames(6))).variable_rate


@pytest.mark.parametrize("width", [48, 24, 64])
def test_widths_decord_refuses_are_read_by_pyav(base, width):
    """decord 0.6 fails on output widths 8, 16, 24, 48, 72 ("The size must exactly match"):
    that is not a corrupt file."""
    frames = FrameReader(probe_stream(base), (32, width)).read([5, 2])
    assert frames.shape == (2, 32, width, 3) and [index_of(f) for f in frames] == [5, 2]


def test_broken_files_are_still_classified(base, tmp_path):
    cut = tmp_path / "cut.mp4"
    ffmpeg("-i", str(base), "-c", "copy", "-movflags", "+faststart", str(cut))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # the index kept, the frames cut off
    with pytest.raises(VideoReadError) as caught:
        probe_stream(cut)
    assert caught.value.kind == "corrupt" and "corrupt video stream" in str(caught.value)
    with pytest.raises(MediaReadError) as training:
        read_clip(cut, 2, 32)
    assert training.value.reason == "corrupt"
    (tmp_path / "junk.mp4").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(VideoReadError) as caught:
        probe_stream(tmp_path / "junk.mp4")
    assert caught.value.kind == "unreadable"


def test_a_training_folder_reads_gifs_and_portrait_clips(base, tmp_path):
    from data.datasets import VideoClipDataset

    write_animation(tmp_path / "anim.gif", indexed_frames(6), [100] * 6)
    with_display_matrix(base, tmp_path / "phone.mp4", -90)
    dataset = VideoClipDataset(root=str(tmp_path), num_frames=3, size=32, stride=2, train=False)
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 2 and not dataset.skipped
    for item in items:
        pixels = ((item["frames"] + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        assert [index_of(f) for f in pixels] == [0, 2, 4]
