"""A one-frame edit with ControlNet units equals diffusers'
``StableDiffusionControlNetImg2ImgPipeline`` for the same files, prompt, seed, sampler, scales
and step fractions; units act where and when they should."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.nets.controlnet import ControlNet
from model.sd.control import Control, ControlUnit
from model.sd.controlnet import controlnet_names, load_controlnet
from model.sd.loading import load_sd
from tests.sd_files import diffusers_pipeline, tiny_config, write_tiny_sd
from tests.sd_layout import randomise
from tests.test_sd_edit import NEGATIVE, OURS, PROMPT, SIZE, scheduler

diffusers = pytest.importorskip("diffusers")
WIDTHS = (16, 32, 64)  # the tiny VAE's factor 4


def as_diffusers(net: ControlNet, unet) -> diffusers.ControlNetModel:
    """diffusers' ControlNetModel for ``unet`` holding ``net``'s weights under diffusers'
    names (the names are tested against diffusers' own converter in test_controlnet)."""
    theirs = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=WIDTHS, load_weights_from_unet=False
    )
    names = controlnet_names(net)
    state = {}
    for key, value in net.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"{names[module]}.{param}"] = value
    theirs.load_state_dict(state, strict=True)
    return theirs.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random SD 1.x file and two random ControlNets for it (original layout): ours
    loaded from the files, and diffusers' pipeline pieces on the same weights."""
    folder = tmp_path_factory.mktemp("cn_edit")
    config = tiny_config("sd1", "eps")
    path, state = write_tiny_sd(folder, "sd.safetensors", config)
    pipe = diffusers_pipeline(state, config, scheduler("ddim", "eps"), folder)
    nets = []
    for seed in (11, 12):
        cn_state = randomise(ControlNet(hint_widths=WIDTHS, **config.unet).state_dict(), seed)
        cn_path = folder / f"control_{seed}.safetensors"
        save_file({"control_model." + k: v for k, v in cn_state.items()}, str(cn_path))
        nets.append(load_controlnet(cn_path, config.unet))
    return load_sd(path), pipe, nets


def inputs(seed: int, units: int):
    gen = torch.Generator().manual_seed(seed)
    frame = torch.rand(1, 3, SIZE, SIZE, generator=gen)  # [0, 1], as diffusers takes images
    hints = [torch.rand(1, 3, SIZE, SIZE, generator=gen) for _ in range(units)]
    return frame, hints


CASES = {  # sampler, strength, per unit (scale, start, end)
    "ddim-img2img": ("ddim", 0.75, [(0.8, 0.0, 1.0)]),
    "euler-two-units": ("euler", 0.8, [(1.0, 0.0, 0.5), (0.6, 0.25, 1.0)]),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_one_frame_controlnet_edit_is_diffusers_image(setup, case):
    model, pipe, nets = setup
    sampler, strength, spec = CASES[case]
    frame, hints = inputs(3, len(spec))
    cns = [as_diffusers(net, pipe.unet) for net in nets[: len(spec)]]
    theirs_pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pipe(
        pipe, controlnet=cns if len(cns) > 1 else cns[0]
    )
    theirs_pipe.scheduler = scheduler(sampler, "eps")
    theirs_pipe.set_progress_bar_config(disable=True)
    seed, steps = 77, 4
    theirs = theirs_pipe(
        PROMPT,
        image=frame,
        control_image=hints if len(cns) > 1 else hints[0],
        strength=strength,
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        controlnet_conditioning_scale=[s for s, _, _ in spec] if len(cns) > 1 else spec[0][0],
        control_guidance_start=[a for _, a, _ in spec] if len(cns) > 1 else spec[0][1],
        control_guidance_end=[b for _, _, b in spec] if len(cns) > 1 else spec[0][2],
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    ).images
    units = tuple(
        ControlUnit(net, hint[:, None], scale, start, end)
        for net, hint, (scale, start, end) in zip(nets, hints, spec, strict=False)
    )

    def edit(control):
        return edit_video(
            model,
            frame[:, None] * 2 - 1,
            model.encode_prompt(PROMPT, NEGATIVE),
            EditSettings(
                steps=steps, w=7.5, strength=strength, source_latents="sample", **OURS[sampler]
            ),
            generator=torch.Generator().manual_seed(seed),
            control=control,
        )

    ours = (edit(Control(units)).frames[0] + 1) / 2
    without = edit(None)
    assert (ours - (without.frames[0] + 1) / 2).abs().max() > 0.01  # the units acted
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=0)
