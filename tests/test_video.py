"""Reading clips with decord (frame choice, crops, classified errors) and writing mp4 files."""

import subprocess

import av
import decord
import numpy as np
import pytest
import torch

from data.audio import plan_audio, prepare_audio
from data.io import write_video
from data.video import MediaReadError, read_clip

FPS = 30
NUM_FRAMES = 60


def brightness_of(index: int) -> int:
    return 10 + 4 * index


def index_of(frames: torch.Tensor) -> list[int]:
    """Invert ``brightness_of`` from decoded frames in [-1, 1]."""
    levels = ((frames + 1) * 127.5).mean(dim=(1, 2, 3))
    return [round((float(level) - 10) / 4) for level in levels]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Test files: frames whose grey level encodes their index, colour bands, broken files."""
    folder = tmp_path_factory.mktemp("videos")
    grey = np.stack([np.full((96, 128, 3), brightness_of(i), np.uint8) for i in range(NUM_FRAMES)])
    write_video(folder / "indexed.mp4", grey, FPS, crf=0)
    bands = np.zeros((4, 128, 384, 3), np.uint8)
    bands[:, :, :128, 0] = bands[:, :, 128:256, 1] = bands[:, :, 256:, 2] = 255
    write_video(folder / "bands.mp4", bands, FPS, crf=0)
    good = (folder / "indexed.mp4").read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])  # moov atom at the end
    return folder


def test_clip_at_target_fps_has_the_right_frames_shape_and_range(videos):
    clip = read_clip(videos / "indexed.mp4", 8, 64, fps=10)
    assert clip.frames.shape == (8, 3, 64, 64) and clip.frames.dtype == torch.float32
    assert clip.frames.min() >= -1 and clip.frames.max() <= 1
    assert clip.indices == list(range(0, 24, 3)) and clip.fps == pytest.approx(10)
    assert index_of(clip.frames) == clip.indices  # the decoded pixels are those frames


def test_random_start_with_stride_is_seeded_and_stays_in_the_video(videos):
    starts = set()
    for seed in range(6):
        clip = read_clip(videos / "indexed.mp4", 6, 64, stride=4, rng=np.random.default_rng(seed))
        again = read_clip(videos / "indexed.mp4", 6, 64, stride=4, rng=np.random.default_rng(seed))
        assert torch.equal(clip.frames, again.frames)
        assert np.diff(clip.indices).tolist() == [4] * 5 and clip.indices[-1] < NUM_FRAMES
        assert index_of(clip.frames) == clip.indices
        starts.add(clip.indices[0])
    assert len(starts) > 1


def test_start_and_end_seconds_bound_the_clip(videos):
    fixed = read_clip(videos / "indexed.mp4", 4, 64, start=1.0, end=1.5)
    assert fixed.indices == [30, 31, 32, 33]
    for seed in range(5):
        clip = read_clip(
            videos / "indexed.mp4", 4, 64, start=1.0, end=1.5, rng=np.random.default_rng(seed)
        )
        assert 30 <= clip.indices[0] and clip.indices[-1] < 45


def test_centre_crop_keeps_the_middle_and_random_crops_move(videos):
    centre = read_clip(videos / "bands.mp4", 2, 64)  # 384x128 -> 192x64 -> middle 64x64
    rgb = ((centre.frames[0, :, :, 4:-4] + 1) * 127.5).mean(dim=(1, 2))
    assert rgb[1] > 200 and rgb[0] < 40 and rgb[2] < 40  # only the green band
    crops = {
        tuple(
            read_clip(videos / "bands.mp4", 2, 64, rng=np.random.default_rng(s))
            .frames[0, :, 32, 0]
            .tolist()
        )
        for s in range(5)
    }
    assert len(crops) > 1


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.mp4", "missing"),
        ("empty.mp4", "empty"),
        ("garbage.mp4", "unreadable"),
        ("truncated.mp4", "unreadable"),
    ],
)
def test_broken_files_raise_a_classified_error(videos, name, reason):
    with pytest.raises(MediaReadError) as caught:
        read_clip(videos / name, 4, 64)
    assert caught.value.reason == reason and name in str(caught.value)


def test_too_short_video_is_an_error_not_a_shorter_clip(videos):
    with pytest.raises(MediaReadError) as caught:
        read_clip(videos / "indexed.mp4", 16, 64, stride=4)  # needs 61 frames, has 60
    assert caught.value.reason == "too_short"


def test_bad_arguments_are_rejected(videos):
    with pytest.raises(ValueError, match="multiple of 8"):
        read_clip(videos / "indexed.mp4", 4, (64, 60))
    with pytest.raises(ValueError, match="either fps or stride"):
        read_clip(videos / "indexed.mp4", 4, 64, fps=10, stride=2)


def test_write_video_round_trips_through_decord(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = skimage_data.astronaut()  # 512x512 natural image
    frames = np.stack([photo[100 + 4 * i : 196 + 4 * i, 200:328] for i in range(6)])
    path = write_video(tmp_path / "out" / "photo.mp4", frames, 12.5, crf=12)
    reader = decord.VideoReader(str(path))
    assert len(reader) == 6 and reader.get_avg_fps() == pytest.approx(12.5)
    decoded = reader.get_batch(list(range(6))).asnumpy().astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((decoded - frames) ** 2))
    assert psnr > 35
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :95], 12)


def test_write_video_copies_the_source_audio(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    source = tmp_path / "with_audio.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
               "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=10", "-f", "lavfi",
               "-i", "sine=frequency=440:sample_rate=16000", "-t", "1", "-c:v", "libx264",
               "-c:a", "aac", "-pix_fmt", "yuv420p", str(source)]  # fmt: skip
    subprocess.run(command, check=True)
    track = prepare_audio(plan_audio(source), (0.0, 1.0), frame_s=0.1)
    assert track.description == "copied"
    frames = torch.zeros(10, 3, 64, 64)
    out = write_video(tmp_path / "edited.mp4", frames, 10, audio=track)
    with av.open(str(out)) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        assert container.streams.audio[0].codec_context.name == "aac"
        audio_packets = sum(1 for p in container.demux(container.streams.audio[0]) if p.size)
    assert audio_packets > 10
