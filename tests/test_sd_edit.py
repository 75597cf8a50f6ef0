"""Editing with SD checkpoints through the shared pipeline: the same image as diffusers'
``StableDiffusionPipeline`` for the same file, prompt, negative prompt, seed, sampler and
steps; mov2mov's shared noise and frame independence; SD 2-depth and inpainting inputs as
SD's code makes them; methods refused where they do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from model.editing.methods import METHODS, resolve_method
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.sd.loading import load_sd
from model.sd.model import depth_conditioning, inpaint_conditioning
from tests.sd_files import diffusers_pipeline, tiny_config, write_tiny_sd

SIZE = 32
PROMPT, NEGATIVE = "a red striped sphere on a cyan floor", "blurry, grey"
# SD 1.5's shipped scheduler config (scaled_linear, leading spacing, steps_offset 1, the last
# DDIM step to alphas_cumprod[0]); Euler given leading spacing explicitly (its default,
# "linspace", calls the UNet at fractional timesteps).
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "steps_offset": 1, "timestep_spacing": "leading"}  # fmt: skip
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def scheduler(name: str, parameterization: str):
    if name == "ddim":
        return DDIMScheduler(
            **SD_SCHEDULER,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type=PREDICTION[parameterization],
        )
    return EulerDiscreteScheduler(**SD_SCHEDULER, prediction_type=PREDICTION[parameterization])


# ours: the same schedule passed explicitly (and SD's DDIM end at t = 0's noise level)
OURS = {
    "ddim": {"sampler": "ddim", "schedule": "leading", "set_alpha_to_one": False},
    "euler": {"sampler": "euler", "schedule": "leading"},
}


@pytest.fixture(scope="module", params=[("sd1", "eps"), ("sd2", "v")], ids=["sd1-eps", "sd2-v"])
def sd_file(request, tmp_path_factory):
    """A tiny random SD file (SD 1.x: CLIP text in transformers' layout; SD 2.x-style:
    OpenCLIP text, penultimate layer, v-prediction) with its yaml, loaded."""
    kind, parameterization = request.param
    folder = tmp_path_factory.mktemp(kind)
    config = tiny_config(kind, parameterization)
    path, state = write_tiny_sd(folder, f"{kind}.safetensors", config)
    pipe = diffusers_pipeline(state, config, scheduler("ddim", parameterization), folder)
    return load_sd(path), pipe, config


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@torch.no_grad()
def test_a_one_frame_edit_is_diffusers_image_for_the_same_seed(sd_file, sampler):
    model, pipe, config = sd_file
    pipe.scheduler = scheduler(sampler, config.parameterization)
    seed, steps = 1234, 4
    theirs = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    ).images
    result = edit_video(
        model,
        torch.zeros(1, 1, 3, SIZE, SIZE),  # strength 1: the source is not used
        model.encode_prompt(PROMPT, NEGATIVE),
        EditSettings(steps=steps, w=7.5, **OURS[sampler]),
        generator=torch.Generator().manual_seed(seed),
    )
    ours = (result.frames[0] + 1) / 2
    assert result.method == "mov2mov" and result.steps_run == steps
    assert ((theirs > 0.02) & (theirs < 0.98)).float().mean() > 0.5  # not a saturated image
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


def test_mov2mov_starts_every_frame_from_diffusers_noise_for_the_seed():
    noise = METHODS["mov2mov"].noise(
        (1, 5, 4, 6, 7), EditSettings(), torch.Generator().manual_seed(3)
    )
    expected = torch.randn((1, 4, 6, 7), generator=torch.Generator("cpu").manual_seed(3))
    assert all(torch.equal(noise[0, k], expected[0]) for k in range(5))


def frames_of(seed: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, count, 3, SIZE, SIZE, generator=gen) * 2 - 1


@torch.no_grad()
def test_mov2mov_frames_depend_only_on_their_own_input(sd_file):
    model, *_ = sd_file
    prompt = model.encode_prompt(PROMPT)
    settings = EditSettings(
        steps=4, strength=0.6, sampler="euler_a", window_length=2, window_overlap=0
    )

    def edit(frames):
        return edit_video(
            model, frames, prompt, settings, generator=torch.Generator().manual_seed(5)
        )

    video = frames_of(0, 3)
    changed = video.clone()
    changed[:, 1] = frames_of(1, 1)[:, 0]
    first, second = edit(video).frames, edit(changed).frames
    for k in (0, 2):  # untouched frames: the same output, whatever their neighbour became
        torch.testing.assert_close(first[:, k], second[:, k], atol=1e-5, rtol=0)
    assert (first[:, 1] - second[:, 1]).abs().max() > 0.05
    alone = edit(video[:, 2:3]).frames  # frame 2 edited on its own: the same image
    torch.testing.assert_close(first[:, 2], alone[:, 0], atol=1e-5, rtol=0)


def test_an_sd_model_runs_mov2mov_only(sd_file):
    model, *_ = sd_file
    assert resolve_method(model).name == "mov2mov"
    with pytest.raises(ValueError, match="'gen1' does not run on this StableDiffusion.*mov2mov"):
        resolve_method(model, "gen1")
    with pytest.raises(ValueError, match="unknown editing method 'flow'"):
        resolve_method(model, "flow")
    with pytest.raises(TypeError, match="encode_prompt"):
        edit_video(model, frames_of(0, 1), torch.zeros(1, 1, 32), EditSettings(steps=1))


def test_the_text_encoder_runs_once_per_prompt(sd_file):
    model, *_ = sd_file
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        embedding = model.encode_prompt(PROMPT, NEGATIVE)
        edit_video(model, frames_of(0, 3), embedding, EditSettings(steps=2, strength=0.5))
    finally:
        handle.remove()
    assert calls == [(2, 77)]  # one batched call: negative prompt and prompt, never again
    empty = model.encode_prompt(PROMPT)
    assert torch.equal(empty.uncond, model.text_encoder.encode([""]))  # SD's uncond: not zeros


def test_depth_conditioning_is_ldms():
    """LatentDepth2ImageDiffusion.get_input: bicubic to the latent size, then per image
    2 (d - min) / (max - min + 0.001) - 1."""
    depth = torch.rand(2, 3, 1, 40, 24, generator=torch.Generator().manual_seed(0)) * 7 + 1
    got = depth_conditioning(depth, (5, 3))
    cc = F.interpolate(depth.flatten(0, 1), size=(5, 3), mode="bicubic", align_corners=False)
    low, high = (
        torch.amin(cc, dim=[1, 2, 3], keepdim=True),
        torch.amax(cc, dim=[1, 2, 3], keepdim=True),
    )
    expected = 2.0 * (cc - low) / (high - low + 0.001) - 1.0
    torch.testing.assert_close(got, expected.unflatten(0, (2, 3)))
    assert got.amin() == -1 and got.amax() < 1


@torch.no_grad()
def test_an_sd2_depth_edit_follows_its_midas_depth(tmp_path):
    config = tiny_config("sd2", "eps", conditioning="depth")
    path, _ = write_tiny_sd(tmp_path, "depth.safetensors", config)
    model = load_sd(path)
    assert model.depth is not None and model.uses_depth
    prompt, video = model.encode_prompt(PROMPT), frames_of(0, 2)
    settings = EditSettings(steps=2, strength=0.7)

    def edit(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return edit_video(model, video, prompt, settings, generator=generator, **kwargs)

    own = edit()
    assert own.depth.shape == (1, 2, 1, SIZE, SIZE)  # its MiDaS ran on the frames
    flat, steep = (
        torch.ones(1, 2, 1, SIZE, SIZE),
        torch.linspace(0, 1, SIZE).expand(1, 2, 1, SIZE, SIZE),
    )
    assert (edit(depth=flat).frames - edit(depth=steep).frames).abs().max() > 1e-3


@torch.no_grad()
def test_inpainting_models_take_mask_and_masked_latents(tmp_path):
    config = tiny_config("sd1", conditioning="inpaint")
    path, _ = write_tiny_sd(tmp_path, "inpaint.safetensors", config)
    model = load_sd(path)
    video = frames_of(2, 2)
    mask = torch.zeros(1, 1, 1, SIZE, SIZE)
    mask[..., :, : SIZE // 2] = 1
    extra = inpaint_conditioning(model.vae, video, mask, (8, 8))
    assert extra.shape == (1, 2, 5, 8, 8)
    assert torch.equal(extra[0, 0, 0, :, :4], torch.ones(8, 4)) and extra[0, :, 0, :, 4:].sum() == 0
    masked = video * (1 - mask)
    torch.testing.assert_close(extra[:, :, 1:], model.vae.encode(masked))
    result = edit_video(
        model, video, model.encode_prompt(PROMPT), EditSettings(steps=2), mask=mask,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    keep = mask.expand_as(video) == 0
    torch.testing.assert_close(result.frames[keep], video[keep])  # outside the mask: the input


@torch.no_grad()
def test_half_precision_sd_edit_is_close_to_float32(tmp_path):
    """Weights cast as infer.py casts them (norms stay float32), run under autocast (bf16 on
    the CPU here; fp16 on a GPU): the prompt encodes and the edit stays near float32's."""
    from model.editing.precision import cast_for_inference

    path, _ = write_tiny_sd(tmp_path, "half.safetensors", tiny_config("sd1"))
    full, half = load_sd(path), cast_for_inference(load_sd(path), torch.bfloat16)
    video, settings = frames_of(3, 2), EditSettings(steps=3, strength=0.8)
    results = [
        edit_video(
            model,
            video,
            model.encode_prompt(PROMPT, NEGATIVE),
            settings,
            generator=torch.Generator().manual_seed(0),
            autocast_dtype=dtype,
        ).frames
        for model, dtype in ((full, None), (half, torch.bfloat16))
    ]
    assert (results[0] - results[1]).abs().mean() < 0.05
