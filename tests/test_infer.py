"""infer.py end to end on the tiny model: frames, fps, size, audio, sidecar, windows, masks,
the release round trip, and one clear line with no output for each bad input."""

import json
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import infer
from data import media
from jobs.editing.request import InferError
from model.training.loading import release_from_checkpoint
from model.weights.atomic import file_sha256
from model.weights.release import read_release, write_release
from tests import media_files
from tests.sd_layout import ROOT
from tests.test_release import write_training_checkpoint

FPS = 12
FAST = [
    "resolution=32",
    "size_multiple=32",
    "steps=2",
    "w=3",
    "midas.name=midas_tiny",
    "progress=false",
    "seed=3",
    "window.length=4",
    "window.overlap=1",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 24-frame 64x48 clip with audio, its checkpoint, a reference image, broken inputs."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    folder = tmp_path_factory.mktemp("infer")
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error"]
    video = ["-f", "lavfi", "-i", f"testsrc2=size=64x48:rate={FPS}"]
    h264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]
    subprocess.run(
        [*ffmpeg, *video, "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000",
         "-t", "2", *h264, "-c:a", "aac", str(folder / "clip.mp4")],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [*ffmpeg, *video, "-t", "2", *h264, "-movflags", "+faststart", str(folder / "fs.mp4")],
        check=True,
    )
    subprocess.run([*ffmpeg, *video, "-t", "1", *h264, str(folder / "short.mp4")], check=True)
    good = (folder / "fs.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])  # header kept, stream cut
    subprocess.run([*ffmpeg, *video, "-frames:v", "0", *h264, str(folder / "zero.mp4")], check=True)
    (folder / "notes.txt").write_text("not a video\n" * 100)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(bytes(range(256)) * 64)
    Image.fromarray(np.full((48, 64, 3), (200, 40, 40), np.uint8)).save(folder / "red.png")
    media_files.write_animation(folder / "anim.webp", media_files.indexed_frames(3), [100] * 3)
    left = np.zeros((48, 64), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(folder / "mask.png")
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(folder / "small_mask.png")
    ramp = np.linspace(0.1, 1, 64, dtype=np.float32)
    np.save(folder / "depth.npy", np.stack([np.tile(np.roll(ramp, i), (48, 1)) for i in range(24)]))
    write_training_checkpoint(folder / "tiny.ckpt")
    return folder


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=list(overrides))


def read(path):
    """(frames (F, H, W, 3) uint8, average fps) of a written mp4, decoded by PyAV (decord
    0.6 cannot decode some widths, 48 among them)."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return np.stack(frames), float(container.streams.video[0].average_rate)


def test_cli_edits_a_video_three_windows_long_with_audio_preview_and_sidecar(files, tmp_path):
    out = tmp_path / "out" / "edited.mp4"
    args = [f"input={files / 'clip.mp4'}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}"]
    args += [f"reference={files / 'red.png'}", "end=12", "preview=true", *FAST]
    done = subprocess.run(
        [sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}: 12 frames, 32x24, 12 fps" in done.stdout  # 64x48 in: aspect kept
    frames, fps = read(out)
    assert frames.shape == (12, 24, 32, 3) and fps == pytest.approx(FPS)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert len(container.streams.audio) == 1
    preview, _ = read(out.with_name("edited.preview.mp4"))
    assert preview.shape == (12, 24, 96, 3)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["checkpoint"]["sha256"] == file_sha256(files / "tiny.ckpt")
    assert sidecar["seed"] == 3 and sidecar["settings"]["steps"] == 2
    assert sidecar["frames"] == {
        "indices": list(range(12)),
        "count": 12,
        "fps": FPS,
        "timing": "constant rate",
        "times_s": [i / FPS for i in range(12)],
        "duration_s": 1.0,
    }
    assert sidecar["size"] == {"output": [24, 32], "working": [32, 32], "latent": [8, 8]}
    assert sidecar["windows"] == [[0, 4], [3, 7], [6, 10], [8, 12]]  # 3x the window length
    assert sidecar["audio"] == "transcoded to aac from aac"  # cut to the kept second
    assert sidecar["audio_span_s"] == pytest.approx([0, 1]) and sidecar["rotation"] == 0
    assert sidecar["source"]["num_frames"] == 24 and sidecar["source"]["audio_codec"] == "aac"
    assert sidecar["versions"]["torch"] == torch.__version__
    assert {"read_s", "load_s", "edit_s", "write_s", "total_s"} <= set(sidecar["timing"])
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "edited.json", "edited.mp4", "edited.preview.mp4"
    ]  # fmt: skip


def test_without_content_or_resolution_the_defaults_apply(files, tmp_path):
    """No content given: the default reference; resolution=native: the size the checkpoint
    was trained at (here a release saying 32), resolution=source: the input's (64x48);
    noise_correlation=null: the checkpoint's (0.75 here), a number overrides it."""
    config_32, state = read_release(release_path(files, tmp_path))
    config_32["sampling"] = {"resolution": 32, "noise_correlation": 0.75}
    write_release(config_32, state, tmp_path / "native32.safetensors")
    out = tmp_path / "default.mp4"
    fast = [a for a in FAST if not a.startswith(("resolution", "size_multiple"))]
    args = [f"input={files / 'clip.mp4'}", f"output={out}", "size_multiple=8", "end=4", *fast]
    args += [f"default_reference={files / 'red.png'}", "reference_frame=null"]
    args += [f"checkpoint={tmp_path / 'native32.safetensors'}"]
    outcome = infer.run(config(*args))
    assert outcome["settings"]["reference"] == str(files / "red.png")
    assert outcome["size"]["output"] == [24, 32]  # longest side 32, aspect kept
    assert outcome["edit"]["noise_correlation"] == 0.75
    assert outcome["settings"]["noise_correlation"] == 0.75  # recorded resolved
    outcome = infer.run(config(*args, "resolution=source", "noise_correlation=0.25"))
    assert outcome["size"]["output"] == [48, 64]
    assert outcome["edit"]["noise_correlation"] == 0.25


def release_path(files, tmp_path):
    released = tmp_path / "tiny.safetensors"
    release_from_checkpoint(files / "tiny.ckpt", released)
    return released


def test_frame_range_stride_prompt_and_mask(files, tmp_path):
    out = tmp_path / "ranged.mp4"
    cfg = config(
        f"input={files / 'clip.mp4'}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}",
        "prompt='a red cube'", "prompt_mode=direct", f"mask={files / 'mask.png'}",
        "start=2", "end=20", "stride=3", "max_frames=5", "crf=0", *FAST,
    )  # fmt: skip
    outcome = infer.run(cfg)
    assert outcome["frames"]["indices"] == [2, 5, 8, 11, 14]
    assert outcome["frames"]["fps"] == FPS / 3
    assert outcome["audio"] == "transcoded to aac from aac"
    assert outcome["audio_span_s"] == pytest.approx([2 / FPS, 17 / FPS])  # 5 frames of 3
    frames, fps = read(out)
    assert frames.shape == (5, 24, 32, 3) and fps == pytest.approx(FPS / 3)
    source = media.read_frames(files / "clip.mp4", [2, 5, 8, 11, 14], (24, 32))
    edited = outcome["result"].frames  # the masked (left) half is edited, the right half kept
    assert torch.equal(edited[..., 17:], source[..., 17:])
    assert (edited[..., :15] - source[..., :15]).abs().mean() > 0.1
    source = ((source[0] + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    outside = np.abs(frames[:, :, 18:].astype(float) - source[:, :, 18:]).mean()
    inside = np.abs(frames[:, :, :14].astype(float) - source[:, :, :14]).mean()
    assert inside > 5 * outside  # still so after H.264


def test_a_release_gives_the_frames_of_its_checkpoint_ema(files, tmp_path):
    released = tmp_path / "tiny.safetensors"
    release_from_checkpoint(files / "tiny.ckpt", released)
    common = [f"input={files / 'clip.mp4'}", "reference_frame=5", "end=8", *FAST]
    common += [f"depth={files / 'depth.npy'}", "midas.name=null", "crf=0"]  # same structure
    a = infer.run(config(*common, f"output={tmp_path / 'a.mp4'}", f"checkpoint={released}"))
    b = infer.run(
        config(*common, f"output={tmp_path / 'b.mp4'}", f"checkpoint={files / 'tiny.ckpt'}")
    )
    assert a["checkpoint"]["format"] == "gen1-release"
    assert b["checkpoint"]["format"] == "gen1-lightning"
    error = (a["result"].frames - b["result"].frames).abs()
    assert error.max() < 0.01 and error.mean() < 1e-3  # fp16 weights
    frames_a, _ = read(tmp_path / "a.mp4")
    frames_b, _ = read(tmp_path / "b.mp4")
    assert np.abs(frames_a.astype(int) - frames_b.astype(int)).mean() < 0.5


BAD = {
    "missing file": (["input={d}/nope.mp4"], "nope.mp4: missing"),
    "not a video": (["input={d}/notes.txt"], "not a video"),
    "an image": (["input={d}/red.png"], "not a video"),
    "empty file": (["input={d}/empty.mp4"], "empty.mp4: empty"),
    "zero frames": (["input={d}/zero.mp4"], "no video frames"),
    "garbage": (["input={d}/garbage.mp4"], "not a readable video"),
    "corrupt stream": (["input={d}/truncated.mp4"], "corrupt video stream"),
    "animated WebP": (["input={d}/anim.webp"], "animated WebP cannot be decoded by this FFmpeg"),
    "start past the end": (["start=30"], "outside"),
    "end past the end": (["end=25"], "outside"),
    "reversed range": (["start=10", "end=5"], "is reversed"),
    "mask of the wrong size": (["mask={d}/small_mask.png"], "mask"),
    "mask video of the wrong length": (["mask={d}/short.mp4"], "has 12 frames"),
    "prompt without a prior": (["reference_frame=null", "prompt=cube", "prior=null"], "prior"),
    "two content sources": (["reference={d}/red.png"], "exactly one"),
    "missing reference": (["reference_frame=null", "reference={d}/none.png"], "missing"),
    "output is the input": (["output={d}/clip.mp4"], "never overwritten"),
    "missing checkpoint": (["checkpoint={d}/none.ckpt"], "not found"),
    "unknown window mode": (
        ["window.mode=rolling"],
        "window.mode must be blend, sequential or fifo",
    ),
    "fifo with a two-step sampler": (
        ["window.mode=fifo", "sampler=heun"],
        "sampler 'heun' has no such step",
    ),
    "fifo with a frame-by-frame method": (
        ["window.mode=fifo", "method=prev_frame", "strength=0.5"],
        "renders frame after frame",
    ),
    "fifo frames per level": (["window.mode=fifo", "window.frames_per_level=0"], "whole number"),
    "fifo anchor outside the first window": (
        ["window.mode=fifo", "window.anchors=[4]"],
        "anchors [4] are not frames of the first window [0, 4)",
    ),
    "fifo with stochastic DDIM": (["window.mode=fifo", "sampler=ddim", "eta=0.5"], "only at eta 0"),
    "no room for new frames": (
        ["window.mode=sequential", "window.anchors=[0,1]", "window.overlap=2"],
        "no room for new frames",
    ),
    "corrupt stream, sequential": (
        ["input={d}/truncated.mp4", "window.mode=sequential"],
        "corrupt video stream",
    ),
    "window over the model's frames": (
        ["window.length=64", "window.overlap=1"],
        "temporal_max_frames",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_a_failure_status_and_no_output(case, files, tmp_path, capfd):
    overrides, message = BAD[case]
    out = tmp_path / "out"
    base = [f"input={files}/clip.mp4", f"output={out}/edited.mp4"]
    base += [f"checkpoint={files}/tiny.ckpt", "reference_frame=0", *FAST]
    before = (files / "clip.mp4").read_bytes()
    assert infer.cli(config(*base, *(o.format(d=files) for o in overrides))) == 1
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer.py: error:"), captured.err
    assert message in lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert (files / "clip.mp4").read_bytes() == before


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """Inputs of the kinds users hand in: a phone's portrait clip (landscape frames with a
    90-degree display turn), variable-rate mp4 with AAC, a GIF, an IP camera's mu-law AVI,
    and an AVI whose audio codec FFmpeg does not know."""
    folder = tmp_path_factory.mktemp("field")
    landscape = media_files.write_media(folder / "landscape.mp4", media_files.indexed_frames(8))
    media_files.with_display_matrix(landscape, folder / "phone.mp4", -90)
    pts = [3000 * i for i in range(5)] + [15000 + 18000 * i for i in range(5)]
    media_files.write_media(
        folder / "vfr.mp4",
        media_files.indexed_frames(10),
        pts=pts,
        time_base=Fraction(1, 90000),
        audio=media_files.clicks(1.2, 16000),
    )
    media_files.write_animation(folder / "anim.gif", media_files.indexed_frames(6), [100] * 6)
    for name in ("camera.avi", "odd.avi"):
        media_files.write_media(
            folder / name,
            media_files.indexed_frames(8),
            video_codec="mpeg4",
            audio=media_files.clicks(8 / FPS, 8000),
            audio_rate=8000,
            audio_codec="pcm_mulaw",
        )
    media_files.unknown_audio_codec(folder / "odd.avi")
    write_training_checkpoint(folder / "tiny.ckpt")
    return folder


def edit_field(field, tmp_path, name, *overrides):
    """infer.run on ``field / name`` at 64 px (aspect kept), with a preview."""
    out = tmp_path / "edited.mp4"
    fast = [a for a in FAST if not a.startswith(("resolution", "size_multiple"))]
    args = [f"input={field / name}", f"output={out}", f"checkpoint={field / 'tiny.ckpt'}"]
    args += ["reference_frame=0", *fast, "resolution=64", "size_multiple=16", "preview=true"]
    return out, infer.run(config(*args, *overrides))


def test_a_portrait_phone_video_is_edited_upright(field, tmp_path):
    out, outcome = edit_field(field, tmp_path, "phone.mp4", "max_frames=4")
    assert outcome["rotation"] == 90 and outcome["size"]["output"] == [64, 48]
    assert (outcome["source"]["height"], outcome["source"]["width"]) == (64, 48)
    frames, _ = read(out)
    assert frames.shape == (4, 64, 48, 3)  # portrait, as players show the input
    preview, _ = read(out.with_name("edited.preview.mp4"))
    seen = preview[0, :, :48].astype(float)  # the input as the model saw it
    assert seen[:8, -8:].mean() > 200 and seen[:8, :8].mean() < 120  # the mark: top right


def test_a_variable_rate_video_keeps_its_frame_times_and_audio_sync(field, tmp_path):
    out, outcome = edit_field(field, tmp_path, "vfr.mp4", "start=2")
    assert outcome["frames"]["timing"] == "source timestamps"
    expected = [0, 1 / 30, 2 / 30] + [(15000 + 18000 * i) / 90000 - 2 / 30 for i in range(5)]
    assert outcome["frames"]["times_s"] == pytest.approx(expected)
    times, video_end = media_files.video_times(out)
    assert times == pytest.approx(expected, abs=1e-4)
    assert outcome["audio"] == "transcoded to aac from aac"
    samples, rate, start, audio_end = media_files.audio_of(out)
    assert start == 0 and abs(audio_end - video_end) <= 1 / 30
    assert outcome["audio_span_s"] == pytest.approx([2 / 30, 2 / 30 + video_end], abs=1e-3)
    clicks = [t - 2 / 30 for t in (0.125, 0.375, 0.625, 0.875)]  # media_files.clicks
    assert media_files.click_times(samples, rate) == pytest.approx(clicks, abs=0.003)


def test_a_gif_is_edited(field, tmp_path):
    out, outcome = edit_field(field, tmp_path, "anim.gif")
    assert outcome["source"]["format"] == "gif" and outcome["frames"]["count"] == 6
    assert outcome["frames"]["timing"] == "constant rate" and outcome["frames"]["fps"] == 10
    assert outcome["audio"] == "none" and read(out)[0].shape == (6, 48, 64, 3)


def test_camera_audio_is_transcoded_to_aac_before_the_edit(field, tmp_path, capfd):
    out, outcome = edit_field(field, tmp_path, "camera.avi", "end=6")
    assert outcome["audio"] == "transcoded to aac from pcm_mulaw"
    with av.open(str(out)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    _, _, _, audio_end = media_files.audio_of(out)
    assert abs(audio_end - media_files.video_times(out)[1]) <= 1 / FPS


def test_audio_ffmpeg_cannot_decode_is_dropped_with_the_reason(field, tmp_path, capfd):
    out = tmp_path / "edited.mp4"
    fast = [a for a in FAST if not a.startswith(("resolution", "size_multiple"))]
    args = [f"input={field / 'odd.avi'}", f"output={out}", f"checkpoint={field / 'tiny.ckpt'}"]
    cfg = config(*args, "reference_frame=0", *fast, "resolution=64", "size_multiple=16")
    assert infer.cli(cfg) == 0
    assert "audio dropped: its codec is unknown to FFmpeg" in capfd.readouterr().out
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["audio"] == "dropped: its codec is unknown to FFmpeg (no decoder)"
    assert sidecar["audio_span_s"] is None
    with av.open(str(out)) as container:
        assert not container.streams.audio


@pytest.fixture(scope="module")
def odd_clip(tmp_path_factory):
    """An 88x36 clip (a 2.44:1 frame whose height is no multiple of 8), 6 frames."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    path = tmp_path_factory.mktemp("aspect") / "wide.mp4"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=88x36:rate={FPS}", "-t", "0.5", "-c:v", "libx264", "-pix_fmt",
         "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("resolution", "output", "working"),
    [("source", [36, 88], [40, 88]), ("64", [26, 64], [32, 64]), ("40", [16, 40], [16, 40])],
)
def test_the_output_keeps_the_aspect_and_source_keeps_the_size(
    files, odd_clip, tmp_path, resolution, output, working
):
    """No squashing to a square, no rounding of sides to 64: the output has the source's aspect
    (its exact size with resolution=source); the model works on it padded and it is cropped
    back."""
    fast = [a for a in FAST if not a.startswith(("resolution", "size_multiple"))]
    out = tmp_path / "wide_out.mp4"
    cfg = config(
        f"input={odd_clip}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}",
        "reference_frame=0", "max_frames=2", f"resolution={resolution}", *fast,
    )  # fmt: skip
    outcome = infer.run(cfg)
    assert outcome["size"]["output"] == output and outcome["size"]["working"] == working
    assert read(out)[0].shape[1:3] == tuple(output)
    assert outcome["result"].frames.shape[-2:] == tuple(output)


def test_any_file_name_works_as_typed_in_a_shell(files, tmp_path):
    """Names Hydra's grammar reserves (=, commas, brackets, quotes, #, spaces, non-ASCII) work
    unquoted as input, output, checkpoint and reference."""
    weird = tmp_path / "vidéo_日本 it's"
    weird.mkdir()
    video = weird / "clip,v2 (1) #[a].mp4"
    video.write_bytes((files / "clip.mp4").read_bytes())
    checkpoint = weird / "epoch=3-step=400.ckpt"
    checkpoint.write_bytes((files / "tiny.ckpt").read_bytes())
    reference = weird / "it's.png"
    reference.write_bytes((files / "red.png").read_bytes())
    out = weird / "out, edited (final).mp4"
    args = [f"input={video}", f"output={out}", f"checkpoint={checkpoint}", f"reference={reference}"]
    done = subprocess.run(
        [sys.executable, "infer.py", *args, "max_frames=2", *FAST, "progress=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and out.is_file()
    # stderr is a pipe, not a terminal: no progress-bar redraws in it, only whole lines
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["input"] == str(video) and sidecar["settings"]["reference"] == str(reference)


def test_ctrl_c_is_one_line_and_leaves_nothing(files, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("jobs.editing.run.edit_video", interrupted)
    out = tmp_path / "out" / "edited.mp4"
    args = [f"input={files / 'clip.mp4'}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}"]
    assert infer.cli(config(*args, "reference_frame=0", *FAST)) == 130
    assert capsys.readouterr().err == "infer.py: interrupted; nothing was written\n"
    assert not out.parent.exists() or not any(out.parent.iterdir())


ANNOUNCED = {
    "blend": (
        ["strength=0.5"],
        "editing 12 frames at 32x24 (padded to 32x32), latents 8x8, 4 window(s) of up to 4 "
        "frames, 2 of 4 dpmpp_2m steps, on cpu in float32",
    ),
    "fifo": (
        ["window.mode=fifo"],
        "editing 12 frames at 32x24 (padded to 32x32), latents 8x8, a queue of up to 4 frames "
        "(1 per noise level) in UNet calls of up to 4, by diagonal denoising (fifo), 4 of 4 "
        "dpmpp_2m steps, on cpu in float32",
    ),
}


@pytest.mark.parametrize("mode", list(ANNOUNCED))
def test_it_says_what_is_about_to_happen(files, tmp_path, caplog, mode):
    args = [f"input={files / 'clip.mp4'}", f"output={tmp_path / 'x.mp4'}"]
    args += [f"checkpoint={files / 'tiny.ckpt'}", "reference_frame=0", "end=12", *FAST]
    overrides, expected = ANNOUNCED[mode]
    with caplog.at_level("INFO", logger="infer"):
        infer.run(config(*args, "steps=4", *overrides))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "infer"]
    assert line == expected


@pytest.mark.parametrize(
    "override,message",
    [
        ("precision=bf16", "has no native bf16 (AVX512-BF16 or AMX)"),
        ("prepack=maybe", "prepack must be auto, true or false"),
    ],
)
def test_cpu_fast_path_settings_are_refused_in_one_line(
    override, message, files, tmp_path, monkeypatch, capfd
):
    monkeypatch.setattr("jobs.editing.request.native_bf16", lambda: False)  # as on AVX2
    out = tmp_path / "out" / "edited.mp4"
    args = [f"input={files / 'clip.mp4'}", f"output={out}", f"checkpoint={files / 'tiny.ckpt'}"]
    assert infer.cli(config(*args, "reference_frame=0", "device=cpu", override, *FAST)) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer.py: error:") and message in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"


def test_infer_edits_with_an_sd_file_and_a_prompt(files, tmp_path):
    """The bundled tiny SD single file through infer.py, exactly as a real SD 1.5 file goes:
    mov2mov by default, its yaml beside it, the prompt and negative prompt through its own
    text encoder; image content is refused for it, and so is the Gen-1 method."""
    out = tmp_path / "sd.mp4"
    common = [f"input={files / 'clip.mp4'}", f"checkpoint={TINY_SD}", "end=3", "steps=3"]
    common += ["progress=false", "seed=1"]
    outcome = infer.run(
        config(*common, f"output={out}", "prompt='a red striped sphere'", "negative_prompt=blue")
    )
    assert outcome["method"] == "mov2mov" and outcome["checkpoint"]["format"] == "sd"
    assert outcome["checkpoint"]["model"]["config_source"].endswith("tiny_sd.yaml")
    assert outcome["size"]["output"] == [48, 64]  # native 64 px, the input's 4:3 kept
    assert read(out)[0].shape == (3, 48, 64, 3)
    for bad, message in [
        ([f"reference={files / 'red.png'}"], "conditioned on text"),
        ([], "give prompt=TEXT"),
        (["prompt=x", "method=gen1"], "does not run on this StableDiffusion"),
        (["prompt=x", "method=warp"], "unknown method 'warp'"),
    ]:
        with pytest.raises(InferError, match=message):
            infer.run(config(*common, f"output={tmp_path / 'bad.mp4'}", *bad))
    assert not (tmp_path / "bad.mp4").exists()
