"""The training-free editing methods (``model.editing.methods``): each runs through infer.py
on a bundled clip with the bundled tiny SD, records its settings, and does what it says; the
tests fail if a method did nothing (its frames would equal mov2mov's), and settings that cannot
work are refused in one line before any compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import infer
from data.media import read_frames
from jobs.editing.request import InferError
from model.diffusion.samplers import sample_euler
from model.editing.methods import get_method
from model.editing.methods.base import SamplingRun
from model.editing.methods.cross_frame import anchor_table, window_plan
from model.editing.methods.motion import phase_correlation, video_motion
from model.editing.methods.motion_noise import motion_noise
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.sd.loading import load_sd
from model.training.loading import load_gen1
from tests.sd_layout import ROOT

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
GEN1 = ROOT / "bundle" / "tiny_world" / "gen1_tiny_world.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "samples" / "clip_a.mp4"
PROMPT = "a white checkered sphere on a cyan checkered floor"
METHODS = ["mov2mov", "cross_frame", "motion_noise", "cross_frame+motion_noise", "multi_frame",
           "prev_frame"]  # fmt: skip


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=list(overrides))


def sd_args(out) -> list[str]:
    return [f"input={CLIP}", f"output={out}", f"checkpoint={TINY_SD}", "end=3", "steps=3",
            "strength=0.7", "seed=4", "progress=false", f"prompt='{PROMPT}'"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_through_infer_with_the_tiny_sd(tmp_path, method):
    out = tmp_path / "out.mp4"
    outcome = infer.run(config(*sd_args(out), f"method={method}", "cross_frame.anchors=[0,2]"))
    assert outcome["method"] == method and outcome["frames"]["count"] == 3
    sidecar = json.loads(out.with_suffix(".json").read_text())
    expected = {
        "mov2mov": {},
        "cross_frame": {"anchors": [0, 2]},
        "multi_frame": {"canvas": ["previous", "current", "first"]},
        "prev_frame": {"warp": True},
    }
    if method in expected:
        assert sidecar["method_settings"] == expected[method]
    else:
        assert "motion" in sidecar["method_settings"]
    assert sidecar["edit"]["method"] == method


@pytest.fixture(scope="module")
def sd():
    model = load_sd(TINY_SD)
    frames = read_frames(CLIP, list(range(4)), (64, 64))
    return model, frames, model.encode_prompt(PROMPT, "")


def edit(model, frames, content, depth=None, **settings):
    values = {"steps": 3, "strength": 0.75, "w": 5.0, "prepack": False, **settings}
    generator = torch.Generator().manual_seed(0)
    settings = EditSettings(**values)
    return edit_video(model, frames, content, settings, depth=depth, generator=generator).frames


def perturbed(frames: torch.Tensor) -> torch.Tensor:
    """The clip with frame 0 replaced by its mirror image: every later frame is unchanged."""
    out = frames.clone()
    out[:, 0] = frames[:, 0].flip(-1)
    return out


@pytest.mark.parametrize("method", ["cross_frame", "multi_frame", "prev_frame"])
def test_methods_make_later_frames_depend_on_frame_0_and_mov2mov_does_not(sd, method):
    model, frames, content = sd
    other = perturbed(frames)
    if method == "cross_frame":  # mov2mov: frame k is frame k's edit alone
        before, after = edit(model, frames, content), edit(model, other, content)
        assert torch.equal(before[:, 1:], after[:, 1:])
    before = edit(model, frames, content, method=method)
    after = edit(model, other, content, method=method)
    assert (before[:, 3] - after[:, 3]).abs().mean() > 1e-3


def test_identity_cases_equal_mov2mov(sd):
    """One frame: every method is mov2mov; anchors = the frame itself is plain attention."""
    model, frames, content = sd
    one = frames[:, :1]
    reference = edit(model, one, content)
    for method in METHODS[1:]:
        torch.testing.assert_close(edit(model, one, content, method=method), reference,
                                   atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(
        edit(model, frames, content, method="cross_frame", anchors="self"),
        edit(model, frames, content), atol=1e-5, rtol=0,
    )  # fmt: skip
    first_only = edit(model, frames, content, method="cross_frame")
    torch.testing.assert_close(first_only[:, :1], edit(model, frames[:, :1], content),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert (first_only[:, 1:] - edit(model, frames, content)[:, 1:]).abs().mean() > 1e-3


@pytest.mark.parametrize("anchors", ["first", (1, 3)])
def test_cross_frame_windows_carry_the_anchors_so_nothing_drifts(sd, anchors):
    """Windows of 2 frames give the frames one window of 4 gives: anchors are carried in."""
    model, frames, content = sd
    whole = edit(model, frames, content, method="cross_frame", anchors=anchors, window_length=8)
    windows = edit(
        model,
        frames,
        content,
        method="cross_frame",
        anchors=anchors,
        window_length=2,
        window_overlap=0,
    )
    torch.testing.assert_close(windows, whole, atol=1e-5, rtol=0)


def test_anchor_tables_and_window_plans():
    assert anchor_table("first_previous", 4).tolist() == [[0, 0], [0, 0], [0, 1], [0, 2]]
    assert anchor_table([0, 3], 4).tolist() == [[0, 3]] * 4
    order, local, carried = window_plan(anchor_table("first_previous", 6), slice(4, 6))
    assert order == [0, 3, 4, 5] and carried == 2
    assert local.tolist() == [[0, 0], [0, 1], [0, 1], [0, 2]]  # frame 3's own previous: itself


def test_cross_frame_runs_on_the_gen1_unet_with_temporal_layers_off():
    gen1 = load_gen1(GEN1)
    frames = read_frames(CLIP, list(range(3)), (64, 64))
    content = torch.randn(1, 1, gen1.clip.embed_dim)
    before = edit(gen1, frames, content, method="cross_frame", steps=2)
    after = edit(gen1, perturbed(frames), content, method="cross_frame", steps=2)
    assert (before[:, 2] - after[:, 2]).abs().mean() > 1e-3
    alone = edit(gen1, frames, content, method="mov2mov", steps=2)
    assert torch.equal(alone[:, 2], edit(gen1, perturbed(frames), content, method="mov2mov",
                                         steps=2)[:, 2])  # fmt: skip


def translated_clip(frames: int, step: int, size: int = 64) -> torch.Tensor:
    """A smooth random texture moving ``step`` pixels right per frame, ``(1, F, 3, H, W)``."""
    generator = torch.Generator().manual_seed(1)
    wide = torch.rand(1, 3, size, size + frames * step, generator=generator)
    wide = torch.nn.functional.avg_pool2d(wide, 5, 1, 2) * 2 - 1
    start = frames * step
    return torch.stack([wide[0, :, :, start - k * step : start - k * step + size]
                        for k in range(frames)])[None]  # fmt: skip


def test_phase_correlation_finds_the_translation():
    clip = translated_clip(4, 3)
    assert video_motion(clip)[0, :, 1].round().tolist() == [0, 3, 6, 9]
    assert video_motion(clip)[0, :, 0].abs().max() < 0.5
    a, b = clip[0, 0, 0], clip[0, 1, 0]
    assert phase_correlation(b[None], a[None]).round().tolist() == [[0, -3]]


def test_motion_noise_of_a_translated_clip_is_the_shifted_noise():
    clip = translated_clip(4, 8)  # 8 pixels right per frame: 2 latent pixels at factor 4
    noise = motion_noise((1, 4, 4, 16, 16), clip, torch.Generator().manual_seed(0))
    for k in range(1, 4):
        torch.testing.assert_close(noise[:, k, ..., 2 * k :], noise[:, 0, ..., : 16 - 2 * k])
        assert not torch.equal(noise[:, k, ..., : 2 * k], noise[:, 0, ..., 16 - 2 * k :])
    assert noise[:, 3].std() == pytest.approx(1.0, abs=0.1)


def identity_run(method: str, frames: torch.Tensor, source: torch.Tensor, calls: list, **kw):
    """A run whose denoiser returns its input (x0 = x) from zero noise: every sampler step
    keeps the start, so the output is the start's source; ``calls`` records input shapes."""

    def denoiser(x, sigma, **kwargs):
        calls.append(tuple(x.shape))
        return x

    settings = EditSettings(method=method, strength=0.5, **kw)
    return SamplingRun(sample_euler, denoiser, torch.zeros_like(source),
                       torch.tensor([2.0, 1.0, 0.5, 0.0]), source, 0.5, None,
                       {"cond": {}, "uncond": {}}, {}, frames, 4, settings)  # fmt: skip


def test_multi_frame_edits_on_the_canvas_and_leaves_its_other_parts_out():
    frames = translated_clip(3, 4)
    source = torch.randn(1, 3, 4, 16, 16)
    calls: list = []
    out = get_method("multi_frame").render(identity_run("multi_frame", frames, source, calls))
    assert out.shape == source.shape
    torch.testing.assert_close(out, source)  # each frame's own part: nothing of the others
    assert calls[0] == (1, 1, 4, 16, 16) and calls[-1] == (1, 1, 4, 16, 48)  # the canvas


def test_prev_frame_starts_from_the_previous_output():
    frames = translated_clip(3, 4)  # 1 latent pixel right per frame
    source = torch.randn(1, 3, 4, 16, 16)
    method = get_method("prev_frame")
    calls: list = []
    still = method.render(identity_run("prev_frame", frames, source, calls, warp=False))
    for k in range(3):  # every frame is frame 0's output: its own source never enters
        torch.testing.assert_close(still[:, k], source[:, 0])
    moved = method.render(identity_run("prev_frame", frames, source, calls, warp=True))
    torch.testing.assert_close(moved[:, 2, ..., 2:], source[:, 0, ..., :-2])
    torch.testing.assert_close(moved[:, 2, ..., :1], source[:, 2, ..., :1])  # uncovered: own


def test_settings_that_cannot_work_are_refused_in_one_line(tmp_path):
    out = tmp_path / "bad.mp4"
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    for bad, message in [
        (["method=prev_frame", "strength=1"], "prev_frame .* needs strength < 1"),
        (["method=multi_frame", f"mask={mask}"], "cannot take mask="),
        (["method=cross_frame+prev_frame"], "cross_frame needs the frames sampled together"),
        (["method=motion_noise+cross_frame+motion_noise"], "names a method twice"),
        (["method=cross_frame", "cross_frame.anchors=[0,5]"], r"keyframes \[5\] are outside"),
        (["method=cross_frame", "cross_frame.anchors=last"], "cross_frame.anchors must be"),
        (["method=multi_frame", "multi_frame.canvas=[first,previous]"], "'current' once"),
        (["method=flow+cross_frame"], "unknown method 'flow'"),
        (["method=gen1"], "does not run on this StableDiffusion"),
    ]:
        with pytest.raises(InferError, match=message) as caught:
            infer.run(config(*sd_args(out), *bad))
        assert "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("conditioning", ["depth", "inpaint"])
def test_every_method_runs_on_sd_depth_and_inpainting_files(tmp_path, conditioning):
    """Per-frame conditioning (SD 2-depth's depth, inpainting's mask channels) follows each
    frame through windows and across the multi-frame canvas."""
    from tests.sd_files import tiny_config, write_tiny_sd

    config = tiny_config("sd2" if conditioning == "depth" else "sd1", conditioning=conditioning)
    path, _ = write_tiny_sd(tmp_path, f"{conditioning}.safetensors", config)
    model = load_sd(path)
    frames = translated_clip(3, 8, size=32)
    content = model.encode_prompt(PROMPT)
    depth = None  # (the random MiDaS of a random SD 2-depth file gives NaN: a given depth)
    if conditioning == "depth":
        depth = torch.linspace(0, 1, 32).expand(1, 3, 1, 32, 32) + frames[:, :, :1] * 0.1
    reference = edit(model, frames, content, depth, steps=2)
    for method in METHODS[1:]:
        out = edit(model, frames, content, depth, steps=2, method=method, window_length=2,
                   window_overlap=0)  # fmt: skip
        assert out.shape == frames.shape and torch.isfinite(out).all()
        assert not torch.equal(out[:, 1:], reference[:, 1:]), method


def test_every_method_runs_with_controlnet_units(tmp_path):
    """ControlNet hints are per frame: they follow each frame through the carried anchors,
    the sequential renders and the multi-frame canvas."""
    from safetensors.torch import save_file

    from model.nets.controlnet import ControlNet
    from model.sd.control import Control, ControlUnit
    from model.sd.controlnet import load_controlnet
    from tests.sd_files import tiny_config, write_tiny_sd
    from tests.sd_layout import randomise

    config = tiny_config("sd1", "eps")
    path, _ = write_tiny_sd(tmp_path, "sd.safetensors", config)
    net_state = randomise(ControlNet(hint_widths=(16, 32, 64), **config.unet).state_dict(), 5)
    net_path = tmp_path / "cn.safetensors"
    save_file({"control_model." + k: v for k, v in net_state.items()}, str(net_path))
    model = load_sd(path)
    net = load_controlnet(net_path, config.unet)
    frames = translated_clip(3, 8, size=32)
    hint = (frames + 1) / 2
    content = model.encode_prompt(PROMPT)
    for method in METHODS:
        values = {"steps": 2, "strength": 0.75, "prepack": False, "method": method,
                  "window_length": 2, "window_overlap": 0}  # fmt: skip

        def run(control, values=values):
            generator = torch.Generator().manual_seed(0)
            return edit_video(model, frames, content, EditSettings(**values),
                              generator=generator, control=control).frames  # fmt: skip

        controlled = run(Control((ControlUnit(net, hint, 1.0, 0.0, 1.0),)))
        assert controlled.shape == frames.shape and torch.isfinite(controlled).all()
        assert not torch.equal(controlled, run(None)), method
