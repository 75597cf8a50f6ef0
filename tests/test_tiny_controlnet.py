"""The bundled tiny depth ControlNet: it loads for the bundled tiny SD by its original-layout
keys, and with it the tiny SD's edits of held-out world clips keep the input's structure
measurably better than without (Gen-1's structure fidelity, MiDaS tiny on both)."""

from __future__ import annotations

import torch

from data.synthetic import SyntheticWorldDataset
from model.editing.pipeline import edit_video, video_depth
from model.editing.settings import EditSettings
from model.encoders.depth import DepthEstimator, load_midas
from model.encoders.hints import depth_hint
from model.metrics.video import structure_fidelity
from model.sd.control import Control, ControlUnit
from model.sd.controlnet import load_controlnet
from model.sd.files import peek
from model.sd.loading import load_sd
from tests.sd_layout import ROOT

BUNDLE = ROOT / "bundle"
CONTROLNET = BUNDLE / "tiny_sd" / "tiny_controlnet_depth.safetensors"


def test_the_file_is_in_the_original_layout():
    keys = peek(CONTROLNET).shapes
    assert all(k.startswith("control_model.") for k in keys)
    assert "control_model.input_hint_block.0.weight" in keys
    assert any(k.startswith("control_model.zero_convs.") for k in keys)


@torch.no_grad()
def test_edits_keep_the_structure_better_with_it():
    model = load_sd(BUNDLE / "tiny_sd" / "tiny_sd.safetensors")
    net = load_controlnet(CONTROLNET, model.config.unet)
    midas = DepthEstimator(load_midas(BUNDLE / "tiny_world" / "midas_tiny.safetensors"))
    world = SyntheticWorldDataset(num_clips=6, num_frames=2, split="test")
    errors = {False: [], True: []}
    for i in range(3):
        frames = world[i]["frames"][None]
        prompt = model.encode_prompt(world[3 + i]["caption"])
        depth = video_depth(model, frames, midas)
        hint = depth_hint(depth[0])[None]
        for with_control in (False, True):
            result = edit_video(
                model,
                frames,
                prompt,
                EditSettings(steps=8, strength=0.75),
                generator=torch.Generator().manual_seed(i),
                control=Control((ControlUnit(net, hint),)) if with_control else None,
            )
            out_depth = video_depth(model, result.frames, midas)
            errors[with_control].append(structure_fidelity(depth[0], out_depth[0]))
    without, with_it = sum(errors[False]) / 3, sum(errors[True]) / 3
    assert with_it < 0.7 * without, (with_it, without)
