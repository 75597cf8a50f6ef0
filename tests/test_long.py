"""Long edits window after window (model.editing.long): the plan, carried frames kept fixed,
anchors acting on every later window, memory bounded by a window, and the one-window case
equal to a plain edit. The tiny Gen-1 with its temporal layers on, at 32x32, 2 steps."""

import dataclasses

import av
import pytest
import torch

import infer
from data import media
from model.diffusion.guidance import MaskedDenoiser, Release
from model.editing.long import edit_long_video, long_windows, shared_noise
from model.editing.pipeline import Carry, edit_video
from model.editing.settings import EditSettings
from model.metrics.drift import drift_curve, pair_warp_errors, seam_warp_error
from tests import test_infer
from tests.sd_layout import ROOT
from tests.test_editing import content_of, tiny_gen1, video
from tests.test_infer import FAST, config, read

files = test_infer.files  # the media fixture of infer's tests

SETTINGS = EditSettings(steps=2, w=3.0, window_length=6, window_overlap=2, prepack=False)


@pytest.fixture(scope="module")
def model():
    return tiny_gen1(temporal=True)


@pytest.mark.parametrize(
    "frames, length, overlap, anchors",
    [(30, 8, 2, (0,)), (17, 6, 3, (0, 5)), (5, 8, 2, (0,)), (40, 8, 0, ()), (23, 8, 4, (7,))],
)
def test_windows_make_every_frame_once_and_carry_anchors_and_overlap(
    frames, length, overlap, anchors
):
    windows = long_windows(frames, length, overlap, anchors)
    made = [f for w in windows for f in w.new]
    assert made == list(range(frames))
    for before, window in zip(windows, windows[1:], strict=False):
        assert len(window.frames) <= length
        assert window.anchors == tuple(sorted(anchors))
        last = before.new[-1] + 1
        expected = [f for f in range(last - overlap, last) if f not in anchors]
        assert list(window.overlap) == expected
        assert window.new[0] == last


def test_a_window_without_room_for_new_frames_is_refused():
    with pytest.raises(ValueError, match="no room for new frames"):
        long_windows(20, 4, 3, (0,))
    with pytest.raises(ValueError, match="not frames of the first window"):
        long_windows(20, 8, 2, (9,))


def test_a_video_of_one_window_equals_the_plain_edit(model):
    """One window: the plain edit with the long edit's shared noise, drawn first."""
    frames, depth = video(6)
    content = content_of(model, frames)
    generator = torch.Generator().manual_seed(3)
    common = shared_noise(model, frames.shape, generator)
    plain = edit_video(
        model, frames, content, SETTINGS, depth=depth, generator=generator, common=common
    )
    parts = []
    edit_long_video(
        model,
        6,
        lambda idx: frames[:, idx],
        content,
        SETTINGS,
        lambda window, out, source, depth: parts.append(out),
        read_depth=lambda idx: depth[:, idx],
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(torch.cat(parts, dim=1), plain.frames)


def test_released_overlap_is_sampled_on_and_the_seam_cross_faded(model):
    """hold=1 keeps the overlap as made; hold < 1 changes the frames from the first seam on
    and only there (the first window's frames before the seam are the same), and every
    frame still comes once, in order."""
    frames, depth = video(12)
    content = content_of(model, frames)

    def run(hold):
        parts, order = [], []

        def sink(window, out, source, depth):
            parts.append(out)
            order.extend(window.new)

        edit_long_video(
            model, 12, lambda idx: frames[:, idx], content, SETTINGS, sink, hold=hold,
            read_depth=lambda idx: depth[:, idx], generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        assert order == list(range(12))
        return torch.cat(parts, dim=1)

    held, released = run(1.0), run(0.25)
    torch.testing.assert_close(held[:, :4], released[:, :4])  # frames 4, 5 are the seam
    assert (held[:, 4:6] - released[:, 4:6]).abs().max() > 1e-3


def test_masked_denoiser_lets_a_kept_region_go_below_its_release_sigma():
    source, noise = torch.zeros(1, 2, 1, 2, 2), torch.ones(1, 2, 1, 2, 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1)
    release = Release(torch.tensor([-1.0, 5.0]).view(1, 2, 1, 1, 1), torch.ones(1, 2, 1, 2, 2))
    masked = MaskedDenoiser(lambda x, sigma: x + 100, source, mask, noise, release)
    x = torch.full((1, 2, 1, 2, 2), 7.0)
    held = masked(x, torch.tensor([10.0]))
    assert held[0, 1].eq(0).all() and held[0, 0].eq(107).all()
    assert masked(x, torch.tensor([4.0])).eq(107).all()  # below 5: frame 1 is free too


def test_carried_frames_stay_as_made_and_the_others_are_decoded(model):
    frames, depth = video(6)
    content = content_of(model, frames)
    gen = torch.Generator().manual_seed(0)
    made = torch.randn(1, 6, 4, 8, 8, generator=gen)
    known = torch.tensor([True, True, False, False, False, False])
    carry = Carry(made, torch.randn(made.shape, generator=gen), known)
    out = edit_video(model, frames, content, SETTINGS, depth=depth, carry=carry)
    assert out.frames.shape[1] == 4  # only the new frames are decoded
    torch.testing.assert_close(out.latents[:, :2], made[:, :2], atol=1e-5, rtol=0)


def test_later_windows_follow_the_anchor_frames(model):
    """The anchors are in every later window: a different first window (its content) changes
    the last window's frames even with no overlap left to carry it."""
    frames, depth = video(14)
    content = content_of(model, frames)

    def run(anchors, first_content):
        parts = []
        edit_long_video(
            model,
            14,
            lambda idx: frames[:, idx],
            content,
            dataclasses.replace(SETTINGS, window_overlap=0),
            lambda window, out, source, depth: parts.append(out),
            anchors=anchors,
            read_depth=lambda idx: depth[:, idx],
            content_of=lambda idx: (
                first_content if idx[0] == 0 and len(idx) == 6 and idx[-1] == 5 else content
            ),
            generator=torch.Generator().manual_seed(3),
        )
        return torch.cat(parts, dim=1)

    other = content_of(model, frames[:, 7:8]) * -1
    without = run((), content), run((), other)
    with_anchor = run((0,), content), run((0,), other)
    # No anchors: the last window does not see the first one at all.
    torch.testing.assert_close(without[0][:, -4:], without[1][:, -4:])
    assert (with_anchor[0][:, -4:] - with_anchor[1][:, -4:]).abs().max() > 1e-3


def test_no_call_reads_or_holds_more_than_a_window(model):
    frames, depth = video(25)
    content = content_of(model, frames)
    reads, sizes = [], []
    edit_long_video(
        model,
        25,
        lambda idx: reads.append(list(idx)) or frames[:, idx],
        content,
        SETTINGS,
        lambda window, out, source, depth: sizes.append(out.shape[1]),
        read_depth=lambda idx: depth[:, idx],
        generator=torch.Generator().manual_seed(3),
    )
    assert max(len(r) for r in reads) <= SETTINGS.window_length
    assert sum(sizes) == 25
    assert all(0 in r for r in reads)  # the anchor is in every window


@pytest.mark.parametrize("mode", ["sequential", "fifo"])
def test_infer_streams_every_frame_with_audio_mask_and_preview(files, tmp_path, mode):
    """window.mode=sequential / fifo through infer.py: all 24 frames written (window after
    window, or as they leave the queue), the audio kept, the unmasked right half the input's
    (the mask's left half is edited), the plan (windows, or the queue) in the sidecar."""
    out = tmp_path / "long.mp4"
    cfg = config(
        f"input={files / 'clip.mp4'}",
        f"output={out}",
        f"checkpoint={files / 'tiny.ckpt'}",
        f"reference={files / 'red.png'}",
        f"mask={files / 'mask.png'}",
        f"window.mode={mode}",
        "window.frames_per_level=1",
        "preview=true",
        *FAST,
    )
    done = infer.run(cfg)
    frames, _ = read(out)
    assert frames.shape[0] == 24
    assert read(out.with_name("long.preview.mp4"))[0].shape[0] == 24
    if mode == "sequential":  # FAST: windows of 4, overlap 1, anchor 0: 4 new, then 2 each
        assert done["windows"] == [(0, 4)] + [(s, s + 2) for s in range(4, 24, 2)]
    else:  # 2 steps, one frame per level: a queue of 2
        assert done["windows"] == [] and done["queue"]["frames_per_level"] == 1
        assert done["queue"]["levels"] == 2 and done["queue"]["frames"] == 2
        assert done["edit"]["window_length"] == 4 and done["edit"]["window_overlap"] == 0
    source = media.read_frames(files / "clip.mp4", list(range(24)), (24, 32))[0]
    with av.open(str(out)) as container:
        assert len(container.streams.audio) == 1
    edited = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    right = (edited - source)[..., 20:].abs().mean()
    left = (edited - source)[..., :12].abs().mean()
    assert right < 0.1 < 0.5 < left  # kept outside the mask (up to yuv420p chroma), edited in


def test_drift_is_zero_for_a_still_video_and_sees_a_colour_creep():
    still = torch.rand(1, 3, 16, 16).expand(12, -1, -1, -1) * 2 - 1
    curve = drift_curve(still, block=4)
    assert curve.colour == [0.0, 0.0, 0.0] and curve.histogram == [0.0, 0.0, 0.0]
    creeping = still + torch.linspace(0, 0.6, 12).view(12, 1, 1, 1) * torch.tensor(
        [1.0, 0.0, 0.0]
    ).view(1, 3, 1, 1)
    drift = drift_curve(creeping.clamp(-1, 1), block=4).colour
    assert drift[0] == 0 and drift[1] > 0.05 and drift[2] > drift[1]


def test_seam_warp_error_takes_the_pairs_into_each_window():
    errors = torch.tensor([1.0, 1.0, 9.0, 1.0, 1.0, 9.0, float("nan")])
    across, inside = seam_warp_error(errors, [(0, 3), (3, 6), (6, 8)])
    assert (across, inside) == (9.0, 1.0)
    frames = torch.rand(4, 3, 8, 8) * 2 - 1
    flow = torch.zeros(3, 2, 8, 8)
    pairs = pair_warp_errors(frames, flow)
    torch.testing.assert_close(pairs, (frames[1:] - frames[:-1]).square().mean(dim=(1, 2, 3)))


def test_eval_long_mode_writes_the_drift_table_csv_and_plot(tmp_path):
    """eval.py mode=long on a short clip (the bundled tiny world model): every anchors
    setting scored, the input's own drift as the baseline."""
    from hydra import compose, initialize_config_dir

    from jobs.evaluation import modes
    from tests.sd_layout import ROOT

    out = tmp_path / "long"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "mode=long", f"output_dir={out}", "long.num_frames=18", "long.block=6",
            "long.steps=1", "progress=false",
        ])  # fmt: skip
    outcome = modes.run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["long.csv", "long.json", "long.md", "long.png"]
    runs = {f"{m} {a}" for m in ("sequential", "fifo") for a in ("none", "first")}
    assert set(outcome["mean"]) == runs | {"input"}
    assert outcome["mean"]["sequential first"]["windows"] == 3  # 8 frames, then 5 new twice
    assert outcome["mean"]["fifo first"]["mode"] == "fifo"
    assert outcome["mean"]["fifo none"]["periodic_step"] >= 1
    assert len(outcome["curves"]["input"]["colour"]) == 3
    assert (out / "long.csv").read_text().count("\n") == 1 + 5 * 3
    assert "| fifo, anchors [0] |" in (out / "long.md").read_text()


def test_eval_long_mode_takes_a_real_clip_with_its_flow_estimated(tmp_path):
    """long.input: a real video (a textured image panning right) edited both ways, its
    flow estimated; the table names the clip, its width keeps the aspect (96x64 -> 64 high,
    96 wide), the input's own warp error under the estimated flow is small."""
    import cv2
    import numpy as np
    from hydra import compose, initialize_config_dir

    from jobs.evaluation import modes
    from tests.media_files import write_media
    from tests.sd_layout import ROOT

    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 255, (8, 24, 3)).astype(np.uint8), (192, 64))
    frames = np.stack([np.roll(texture, k, axis=1)[:, :96] for k in range(18)])
    clip = write_media(tmp_path / "pan.mp4", frames, fps=25)
    out = tmp_path / "real"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "mode=long", f"output_dir={out}", f"long.input={clip}", "long.num_frames=40",
            "long.block=6", "long.steps=1", "long.modes=[fifo]", "progress=false",
        ])  # fmt: skip
    outcome = modes.run(cfg)
    table = (out / "long.md").read_text()
    assert "The real clip pan.mp4 of 18 frames (0.72 s at 25 fps, 96x64)" in table
    assert set(outcome["mean"]) == {"fifo none", "fifo first", "input"}
    assert outcome["mean"]["input"]["warp_error"] < 0.02  # the pan, followed by the flow


def test_eval_long_mode_names_an_unreadable_real_clip(tmp_path):
    from hydra import compose, initialize_config_dir

    from jobs.evaluation import modes
    from jobs.evaluation.settings import EvalError
    from tests.sd_layout import ROOT

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=["mode=long", f"long.input={bad}", "progress=false"])
    with pytest.raises(EvalError, match="long.input: .*broken.mp4"):
        modes.run(cfg)


@pytest.mark.parametrize("mode", ["sequential", "fifo"])
def test_infer_streaming_with_an_sd_file_controlnet_keyframes_and_a_method(tmp_path, mode):
    """The bundled tiny SD with its depth ControlNet on a canny hint, cross-frame attention,
    a prompt keyframed to another: window after window, or through the queue (the anchor as
    every call's frame 0 for cross-frame attention), every frame written."""
    out = tmp_path / "sd.mp4"
    done = infer.run(config(
        f"checkpoint={ROOT / 'bundle/tiny_sd/tiny_sd.safetensors'}", "prompt=a red sphere",
        f"output={out}", "max_frames=12", "steps=2", "progress=false", "seed=1",
        f"window.mode={mode}", "method=cross_frame",
        f"controlnet=[{{file: {ROOT / 'bundle/tiny_sd/tiny_controlnet_depth.safetensors'}, "
        "hint: canny}]",
        "keyframes=[{frame: 0, prompt: a red sphere}, {frame: 11, prompt: a blue cube}]",
    ))  # fmt: skip
    assert read(out)[0].shape[0] == 12
    assert done["keyframes"]["content_keyframes"] == [0, 11]
    assert done["controlnet"][0]["hint"] == "canny" and done["method"] == "cross_frame"


def test_periodic_step_finds_a_seam_of_any_period():
    from model.metrics.drift import periodic_step

    flat = torch.ones(40)
    assert periodic_step(flat)[0] == 1.0
    seams = torch.ones(40)
    seams[4::5] = 3.0  # a step every 5 pairs, at phase 4
    ratio, period, phase = periodic_step(seams)
    assert (period, phase) == (5, 4) and ratio == pytest.approx(3.0 / 1.4)
    with pytest.raises(ValueError, match="at least 16"):
        periodic_step(torch.ones(10))
