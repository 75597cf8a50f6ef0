"""ControlNet units through infer.py with the bundled tiny SD: each hint kind, several units,
the sidecar's record, and one clear line for every bad unit before any compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import infer
from data.io import write_video
from jobs.editing.request import InferError
from model.nets.controlnet import ControlNet
from model.sd.files import peek
from model.sd.loading import resolve_config
from tests.sd_layout import randomise
from tests.test_infer import TINY_SD, config, read
from tests.test_release import write_training_checkpoint

MIDAS = ["midas.name=midas_tiny", "midas.weights=bundle/tiny_world/midas_tiny.safetensors"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 24-frame 64x48 clip of moving bars and a tiny Gen-1 training checkpoint."""
    folder = tmp_path_factory.mktemp("clip")
    x = torch.linspace(0, 6.28, 64)
    frames = torch.stack([torch.sin(x + k / 3).expand(3, 48, 64) for k in range(24)])
    frames[:, 0] *= 0.5
    write_video(folder / "clip.mp4", frames, fps=12)
    write_training_checkpoint(folder / "tiny.ckpt")
    return folder


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    """A random ControlNet (original layout) for the bundled tiny SD's UNet."""
    unet = resolve_config(TINY_SD, peek(TINY_SD).shapes).unet
    state = randomise(ControlNet(hint_widths=(16, 32, 64), **unet).state_dict(), 9)
    path = tmp_path_factory.mktemp("cn") / "control_tiny.safetensors"
    save_file({"control_model." + k: v.half() for k, v in state.items()}, str(path))
    return path


def common(files, out):
    return [f"input={files / 'clip.mp4'}", f"checkpoint={TINY_SD}", "end=3", "steps=3",
            "progress=false", "seed=1", "prompt=a red sphere", f"output={out}"]  # fmt: skip


def test_units_of_every_hint_kind_change_the_edit_and_are_recorded(files, controlnet, tmp_path):
    np.save(tmp_path / "hint.npy", np.random.default_rng(0).random((24, 48, 64), np.float32))
    plain = infer.run(config(*common(files, tmp_path / "plain.mp4")))
    units = (
        f"controlnet=[{{file: {controlnet}, hint: depth, scale: 1.5}},"
        f"{{file: {controlnet}, hint: canny, low: 50, high: 150, end: 0.7}},"
        f"{{file: {controlnet}, hint: {tmp_path / 'hint.npy'}, scale: 0.5}}]"
    )
    out = tmp_path / "cn.mp4"
    outcome = infer.run(config(*common(files, out), *MIDAS, units))
    recorded = json.loads(out.with_suffix(".json").read_text())["controlnet"]
    assert [u["hint"] for u in recorded] == ["depth", "canny", str(tmp_path / "hint.npy")]
    assert recorded[0]["scale"] == 1.5 and recorded[1]["end"] == 0.7 and recorded[1]["low"] == 50
    edited, unedited = read(out)[0].astype(float), read(tmp_path / "plain.mp4")[0].astype(float)
    assert np.abs(edited - unedited).mean() > 1.0  # the units acted
    assert outcome["method"] == plain["method"] == "mov2mov"


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("{file: nope.safetensors}", "ControlNet file not found: nope.safetensors"),
        ("{file: CN, hint: edges}", "hint must be depth, canny, softedge or a hint file"),
        ("{file: CN, hint: softedge}", "hint softedge needs hed=ControlNetHED.pth"),
        ("{file: CN, scale: -1}", "scale must be >= 0"),
        ("{file: CN, start: 0.8, end: 0.5}", "0 <= start < end <= 1"),
        ("{file: CN, weight: 2}", "unknown keys \\['weight'\\]"),
        ("{hint: depth}", "must be \\{file: CONTROLNET"),
    ],
)
def test_a_bad_unit_is_one_line_before_any_compute(files, controlnet, tmp_path, unit, message):
    out = tmp_path / "bad.mp4"
    cfg = config(*common(files, out), f"controlnet=[{unit.replace('CN', str(controlnet))}]")
    with pytest.raises(InferError, match=message):
        infer.run(cfg)
    assert not out.exists()


def test_units_need_an_sd_checkpoint_and_a_fitting_controlnet(files, controlnet, tmp_path):
    gen1 = [f"input={files / 'clip.mp4'}", f"checkpoint={files / 'tiny.ckpt'}", "prompt=x",
            "prompt_mode=direct", f"output={tmp_path / 'g.mp4'}"]  # fmt: skip
    with pytest.raises(InferError, match="needs a Stable Diffusion checkpoint"):
        infer.run(config(*gen1, f"controlnet=[{{file: {controlnet}}}]"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(wrong))
    with pytest.raises(InferError, match="wrong.safetensors does not fit ControlNet"):
        infer.run(
            config(*common(files, tmp_path / "w.mp4"), *MIDAS, f"controlnet=[{{file: {wrong}}}]")
        )
