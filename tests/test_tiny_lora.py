"""The bundled tiny LoRA (``bundle/tiny_sd/tiny_lora_pink_sphere.safetensors``: a pink
sphere's look, trained on training-split world frames, instance prompt "a sks object"): a
kohya file for the tiny SD's UNet; at weight 0 it changes nothing, and at weight 1 the tiny
SD's edits of held-out (test-split) world clips move toward the look (the bundled tiny CLIP's
prompt consistency with "a pink sphere", Gen-1's metric). The edits are the bench's
(``bench/tiny_lora.py``: 8 frames, 20 DPM++ 2M steps, strength 0.75, w 7.5, seed = clip
index) on its first held-out clips: 2 here, 4 in the slow variant (the bench's 20 clips gave
+0.10, standard error 0.03; README, LoRA)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from data.synthetic import SyntheticWorldDataset
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.encoders.clip import load_clip
from model.metrics.video import prompt_consistency
from model.sd.loading import load_sd
from model.sd.lora import merge_loras, read_lora
from tests.sd_layout import ROOT

LORA = ROOT / "bundle" / "tiny_sd" / "tiny_lora_pink_sphere.safetensors"
TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "clip_tiny.safetensors"
LOOK = "a pink sphere"
MARGIN = 0.04  # least mean gain in prompt consistency; clips 0-3 gave +0.15, +0.03, +0.02, +0.09


def test_the_file_is_a_kohya_unet_lora_for_the_tiny_sd():
    lora = read_lora(LORA)
    assert lora.format == "kohya" and lora.parts() == ["unet"]
    assert all(p.key.startswith("lora_unet_") for p in lora.pairs)
    with safe_open(str(LORA), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == TINY_SD.name and meta["ss_base_model_version"] == "sd_v2"
    assert "a sks object" in meta["ss_training_comment"]


@torch.no_grad()
def test_weight_zero_leaves_every_weight_as_it_was():
    model = load_sd(TINY_SD)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with merge_loras([(LORA, 0.0)], model.unet, model.text_encoder):
        after = model.unet.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    with merge_loras([(LORA, 1.0)], model.unet, model.text_encoder):
        assert not all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


@pytest.mark.parametrize(
    "clips",
    [2, pytest.param(4, marks=pytest.mark.slow)],  # ~15 s / ~30 s on one thread
)
@torch.no_grad()
def test_edits_of_held_out_clips_move_toward_the_look_with_it(clips):
    model = load_sd(TINY_SD)
    clip = load_clip(CLIP, "clip_tiny")
    world = SyntheticWorldDataset(num_clips=clips, num_frames=8, split="test")
    settings = EditSettings(steps=20, strength=0.75, w=7.5, sampler="dpmpp_2m", method="mov2mov")
    context = model.encode_prompt("a sks object")

    def edit(i: int, weight: float | None) -> torch.Tensor:
        frames = world[i]["frames"][None]
        generator = torch.Generator().manual_seed(i)
        if weight is None:
            return edit_video(model, frames, context, settings, generator=generator).frames[0]
        with merge_loras([(LORA, weight)], model.unet, model.text_encoder):
            return edit_video(model, frames, context, settings, generator=generator).frames[0]

    gains = [
        prompt_consistency(clip, edit(i, 1.0), LOOK) - prompt_consistency(clip, edit(i, None), LOOK)
        for i in range(clips)
    ]
    assert sum(gains) / clips > MARGIN and all(g > 0 for g in gains), gains
