"""Gen-1 guidance (one batched call, only the needed branches), SDEdit start, masked editing."""

import pytest
import torch
from diffusers import DDIMScheduler

from model.diffusion.guidance import (
    Gen1Guidance,
    MaskedDenoiser,
    sample,
    sdedit_start,
    sdedit_steps,
)
from model.diffusion.samplers import SAMPLERS, DiscreteDenoiser, get_sigmas
from model.diffusion.schedule import DiscreteSchedule, append_dims

SCHEDULE = DiscreteSchedule()
B, F, C, H, W = 2, 3, 4, 4, 4


def toy_unet(calls=None, additive=False):
    """A video 'UNet' (x, t, context, structure, temporal) -> eps whose output depends visibly on
    the content ``context`` (B, 1, D), on ``structure`` and, per sample, on ``temporal`` (frames
    mixed only where it is True). ``additive`` makes the content and temporal effects separable."""

    def unet(x, t, context, structure, temporal):
        if calls is not None:
            calls.append({"batch": x.shape[0], "temporal": temporal, "context": context})
        sigma = append_dims(SCHEDULE.t_to_sigma(t), x.ndim)
        content = context.mean(-1)[:, :, None, None, None]  # (B, 1, 1, 1, 1)
        per_frame = sigma / (1 + sigma**2).sqrt() * x + 0.1 * structure
        across_frames = x.mean(dim=1, keepdim=True) - x  # zero for a still video
        on = temporal.view(-1, 1, 1, 1, 1).to(x.dtype)
        if additive:
            return per_frame + 0.3 * content + 0.5 * on * across_frames
        return per_frame + 0.3 * torch.tanh(content * x) + on * torch.tanh(across_frames + content)

    return unet


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, C, H, W, generator=gen) * 3
    sigma = torch.full((B,), 2.5)
    cond = {
        "context": torch.randn(B, 1, 8, generator=gen),
        "structure": torch.randn(B, F, C, H, W, generator=gen),
    }
    uncond = {"context": torch.zeros(B, 1, 8)}  # structure is shared with cond
    return x, sigma, cond, uncond


def branch(denoiser, x, sigma, kwargs, temporal):
    return denoiser(x, sigma, temporal=torch.full((B,), temporal), **kwargs)


def explicit_branches(denoiser, x, sigma, cond, uncond):
    """img(null), vid(null), vid(c) by three separate calls."""
    null = {**cond, **uncond}
    return (
        branch(denoiser, x, sigma, null, False),
        branch(denoiser, x, sigma, null, True),
        branch(denoiser, x, sigma, cond, True),
    )


def test_gen1_formula_in_one_batched_call():
    calls = []
    denoiser = DiscreteDenoiser(toy_unet(calls), SCHEDULE, "v")
    x, sigma, cond, uncond = inputs()
    img_null, vid_null, vid_c = explicit_branches(denoiser, x, sigma, cond, uncond)
    assert (vid_null - img_null).abs().max() > 0.1 and (vid_c - vid_null).abs().max() > 0.1
    calls.clear()
    w, w_t = 3.0, 1.5
    guided = Gen1Guidance(denoiser, w=w, w_t=w_t)(x, sigma, cond=cond, uncond=uncond)
    expected = img_null + w_t * (vid_null - img_null) + w * (vid_c - vid_null)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and calls[0]["batch"] == 3 * B
    assert calls[0]["temporal"].tolist() == [False] * B + [True] * (2 * B)


def test_w_t_one_is_classifier_free_guidance_on_the_video_model():
    calls = []
    denoiser = DiscreteDenoiser(toy_unet(calls), SCHEDULE, "eps")
    x, sigma, cond, uncond = inputs(1)
    _, vid_null, vid_c = explicit_branches(denoiser, x, sigma, cond, uncond)
    calls.clear()
    guided = Gen1Guidance(denoiser, w=7.5, w_t=1.0)(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(guided, vid_null + 7.5 * (vid_c - vid_null), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and calls[0]["temporal"].tolist() == [True] * (2 * B)


def test_w_t_zero_is_the_image_model():
    """With content and temporal effects separable, w_t = 0 is plain CFG on the image model;
    with w = 0 as well it is the unconditional image model exactly."""
    calls = []
    denoiser = DiscreteDenoiser(toy_unet(calls, additive=True), SCHEDULE, "eps")
    x, sigma, cond, uncond = inputs(2)
    img_null = branch(denoiser, x, sigma, {**cond, **uncond}, False)
    img_c = branch(denoiser, x, sigma, cond, False)
    vid_c = branch(denoiser, x, sigma, cond, True)
    assert (vid_c - img_c).abs().max() > 0.1
    guided = Gen1Guidance(denoiser, w=5.0, w_t=0.0)(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(guided, img_null + 5.0 * (img_c - img_null), atol=1e-5, rtol=1e-5)
    calls.clear()
    unconditional = Gen1Guidance(denoiser, w=0.0, w_t=0.0)(x, sigma, cond=cond, uncond=uncond)
    assert torch.equal(unconditional, img_null)
    assert len(calls) == 1 and calls[0]["temporal"].tolist() == [False] * B


def test_w_one_needs_no_null_branch():
    calls = []
    denoiser = DiscreteDenoiser(toy_unet(calls), SCHEDULE, "v")
    x, sigma, cond, uncond = inputs(3)
    vid_c = branch(denoiser, x, sigma, cond, True)
    calls.clear()
    guided = Gen1Guidance(denoiser, w=1.0, w_t=1.0)(x, sigma, cond=cond, uncond=uncond)
    assert torch.equal(guided, vid_c)
    assert len(calls) == 1 and calls[0]["batch"] == B
    assert torch.equal(calls[0]["context"], cond["context"])  # the null content never ran


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_combining_x0_equals_combining_model_outputs(parameterization):
    """At equal x and sigma, x0 is affine in the model output with weights summing to one."""
    unet = toy_unet()
    w, w_t = 4.0, 1.8
    x, sigma, cond, uncond = inputs(4)
    null = {**cond, **uncond}

    def guided_unet(x_t, t, context, structure):
        def out(kw, temporal):
            return unet(x_t, t, temporal=torch.full((B,), temporal), **kw)

        img_null, vid_null = out(null, False), out(null, True)
        return img_null + w_t * (vid_null - img_null) + w * (out(cond, True) - vid_null)

    ours = Gen1Guidance(DiscreteDenoiser(unet, SCHEDULE, parameterization), w, w_t)
    reference = DiscreteDenoiser(guided_unet, SCHEDULE, parameterization)
    torch.testing.assert_close(
        ours(x, sigma, cond=cond, uncond=uncond), reference(x, sigma, **cond), atol=1e-5, rtol=1e-5
    )


def test_guidance_rejects_temporal_in_cond():
    denoiser = DiscreteDenoiser(toy_unet(), SCHEDULE, "eps")
    x, sigma, cond, uncond = inputs()
    with pytest.raises(ValueError, match="temporal"):
        Gen1Guidance(denoiser, 2.0)(x, sigma, cond={**cond, "temporal": True}, uncond=uncond)
    with pytest.raises(ValueError, match="'context' must have batch size 2"):
        Gen1Guidance(denoiser, 2.0)(x, sigma, cond=cond, uncond={"context": torch.zeros(1, 1, 8)})


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_masked_editing_keeps_unmasked_source(name):
    x, _, cond, uncond = inputs(5)
    denoiser = Gen1Guidance(DiscreteDenoiser(toy_unet(), SCHEDULE, "eps"), w=3.0, w_t=1.2)
    source = x / 3
    mask = torch.zeros(B, F, 1, H, W)
    mask[..., 1:3, 1:3] = 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    sigmas = get_sigmas("karras", 8, SCHEDULE)
    stochastic = name in ("euler_a", "dpmpp_2m_sde", "ddim")
    kwargs = {"generator": torch.Generator().manual_seed(0), "eta": 1.0} if stochastic else {}
    out = sample(
        SAMPLERS[name],
        denoiser,
        noise,
        sigmas,
        source=source,
        mask=mask,
        extra_args={"cond": cond, "uncond": uncond},
        disable=True,
        **kwargs,
    )
    keep = mask.expand_as(out) == 0
    torch.testing.assert_close(out[keep], source[keep], atol=1e-5, rtol=0)
    assert (out - source)[~keep].abs().max() > 0.05


def test_masked_denoiser_feeds_noised_source_outside_the_mask():
    seen = {}

    def inner(x, sigma):
        seen["x"] = x
        return torch.zeros_like(x)

    source, noise, x = torch.randn(3, 1, 2, 4, 4).unbind(0)
    mask = torch.zeros(1, 2, 4, 4)
    mask[..., :2] = 1
    out = MaskedDenoiser(inner, source, mask, noise)(x, torch.tensor([0.7]))
    torch.testing.assert_close(seen["x"], torch.where(mask > 0, x, source + 0.7 * noise))
    torch.testing.assert_close(out, torch.where(mask > 0, torch.zeros_like(x), source))


def test_sdedit_start_matches_diffusers_img2img():
    source, noise = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    scheduler.set_timesteps(20)
    sigmas = get_sigmas("leading", 20, SCHEDULE)
    x, kept = sdedit_start(source, sigmas, 0.6, noise)
    assert len(kept) == 13 and torch.equal(kept, sigmas[8:])  # int(0.6 * 20) = 12 steps
    t_start = scheduler.timesteps[8:9]  # diffusers img2img: timesteps[n - int(n * strength):]
    noised = scheduler.add_noise(source, noise, t_start)
    torch.testing.assert_close(x / (1 + kept[0] ** 2).sqrt(), noised, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="strength"):
        sdedit_start(source, sigmas, 1.5, noise)


def test_sample_strength_steps_and_callback():
    denoiser = DiscreteDenoiser(toy_unet(), SCHEDULE, "eps")
    x, _, cond, _ = inputs(8)
    noise = torch.randn_like(x)
    sigmas = get_sigmas("karras", 10, SCHEDULE)
    steps = []
    common = dict(extra_args={**cond, "temporal": torch.ones(B, dtype=torch.bool)}, disable=True)
    sample(
        SAMPLERS["euler"],
        denoiser,
        noise,
        sigmas,
        source=x,
        strength=0.5,
        callback=steps.append,
        **common,
    )
    assert [s["i"] for s in steps] == list(range(5)) and steps[0]["sigma"] == sigmas[5]
    assert torch.equal(
        sample(SAMPLERS["euler"], denoiser, noise, sigmas, source=x, strength=0.0, **common), x
    )
    fresh = sample(SAMPLERS["euler"], denoiser, noise, sigmas, **common)
    assert torch.isfinite(fresh).all() and fresh.shape == x.shape
    with pytest.raises(ValueError, match="source"):
        sample(SAMPLERS["euler"], denoiser, noise, sigmas, mask=torch.ones_like(x), **common)


def test_any_strength_above_zero_runs_at_least_one_step():
    """strength x steps rounded down (diffusers' img2img), but never 0 for strength > 0: 4 steps
    at strength 0.1 ran nothing and returned the input unchanged."""
    assert [sdedit_steps(4, s) for s in (0.0, 0.01, 0.1, 0.25, 0.5, 0.74, 1.0)] == [
        0,
        1,
        1,
        1,
        2,
        2,
        4,
    ]
    assert sdedit_steps(20, 0.6) == 12 and sdedit_steps(1, 1e-6) == 1
    denoiser = DiscreteDenoiser(toy_unet(), SCHEDULE, "eps")
    x, _, cond, _ = inputs(8)
    steps = []
    out = sample(
        SAMPLERS["euler"],
        denoiser,
        torch.randn_like(x),
        get_sigmas("karras", 4, SCHEDULE),
        source=x,
        strength=0.1,
        callback=steps.append,
        extra_args={**cond, "temporal": torch.ones(B, dtype=torch.bool)},
        disable=True,
    )
    assert len(steps) == 1 and not torch.equal(out, x)
