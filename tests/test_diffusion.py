"""Diffusion math: SD's schedule, zero-terminal-SNR, forward noising and the training loss.

References: diffusers' schedulers (test-only) for the schedule, noising and velocity target.
"""

import pytest
import torch
from diffusers import DDPMScheduler

from model.diffusion.loss import min_snr_weight, training_loss
from model.diffusion.noise import correlate_frames, sample_noise
from model.diffusion.samplers import DiscreteDenoiser
from model.diffusion.schedule import DiscreteSchedule, get_scalings


def sd_scheduler(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kwargs
    )


def test_schedule_matches_diffusers_scaled_linear():
    schedule = DiscreteSchedule()
    reference = sd_scheduler().alphas_cumprod
    assert schedule.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(schedule.alphas_cumprod, reference, atol=2e-6, rtol=0)
    a = schedule.alphas_cumprod.double()
    torch.testing.assert_close(schedule.sigmas.double(), ((1 - a) / a).sqrt(), atol=0, rtol=2e-5)
    assert schedule.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_zero_terminal_snr_matches_diffusers_rescale():
    schedule = DiscreteSchedule(zero_terminal_snr=True)
    reference = sd_scheduler(rescale_betas_zero_snr=True).alphas_cumprod
    assert reference[-1] == 0  # diffusers keeps the exact zero ...
    torch.testing.assert_close(schedule.alphas_cumprod[:-1], reference[:-1], atol=2e-6, rtol=0)
    # ... we floor it at 2^-24 so that sigma_max is finite (about 4096).
    assert schedule.alphas_cumprod[-1] == pytest.approx(2.0**-24)
    assert schedule.sigma_max == pytest.approx(4096, rel=1e-3)
    assert schedule.alphas_cumprod[0] == pytest.approx(DiscreteSchedule().alphas_cumprod[0])


def test_sigma_t_round_trip_and_quantize():
    schedule = DiscreteSchedule()
    t = torch.tensor([0.0, 0.25, 17.6, 500.0, 998.9, 999.0])
    sigma = schedule.t_to_sigma(t)
    torch.testing.assert_close(sigma[[0, 3, 5]], schedule.sigmas[[0, 500, 999]])
    torch.testing.assert_close(schedule.sigma_to_t(sigma), t, atol=2e-3, rtol=0)
    quantized = schedule.sigma_to_t(sigma, quantize=True)
    assert quantized.dtype == torch.long
    assert quantized.tolist() == [0, 0, 18, 500, 999, 999]
    # out-of-range sigmas clamp to the ends of the schedule
    ends = schedule.sigma_to_t(torch.tensor([1e-4, 100.0]))
    assert ends.tolist() == [0.0, 999.0]


def test_q_sample_matches_diffusers_and_k_space():
    schedule = DiscreteSchedule()
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 8, 8, generator=gen), torch.randn(2, 3, 4, 8, 8, generator=gen)
    t = torch.tensor([3, 911])
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, sd_scheduler().add_noise(x0, noise, t), atol=1e-5, rtol=0)
    sigma = schedule.sigmas[t].view(2, 1, 1, 1, 1)
    _, _, c_in = get_scalings(sigma, "eps")
    torch.testing.assert_close(x_t, c_in * (x0 + sigma * noise), atol=1e-5, rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_target_and_model_input(parameterization):
    """The loss regresses diffusers' target (noise, or get_velocity) from q_sample's x_t."""
    schedule = DiscreteSchedule()
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 8, 8, generator=gen), torch.randn(3, 2, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 450, 999])
    reference = sd_scheduler()
    target = noise if parameterization == "eps" else reference.get_velocity(x0, noise, t)
    seen = {}

    def oracle(x_t, timesteps, context):
        seen.update(x_t=x_t, t=timesteps, context=context)
        return target

    context = torch.randn(3, 1, 8)
    out = training_loss(
        oracle, x0, schedule, parameterization, {"context": context}, t=t, noise=noise
    )
    torch.testing.assert_close(seen["x_t"], reference.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    assert torch.equal(seen["t"], t) and seen["context"] is context
    assert out.loss.ndim == 0 and out.per_sample.shape == (3,)
    assert out.loss.item() < 1e-9

    zero = training_loss(
        lambda x, t: torch.zeros_like(x), x0, schedule, parameterization, t=t, noise=noise
    )
    torch.testing.assert_close(zero.per_sample, target.pow(2).flatten(1).mean(1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_and_sampling_share_preconditioning(parameterization):
    """A model that outputs the loss's target exactly makes the sampling denoiser return x0."""
    schedule = DiscreteSchedule()
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    target = noise if parameterization == "eps" else sd_scheduler().get_velocity(x0, noise, t)
    seen = {}

    def oracle(x_t, timesteps):
        seen.update(x_t=x_t, t=timesteps)
        return target

    sigma = schedule.sigmas[t]
    x = x0 + sigma.view(4, 1, 1, 1) * noise
    denoiser = DiscreteDenoiser(oracle, schedule, parameterization)
    torch.testing.assert_close(denoiser(x, sigma), x0, atol=5e-5, rtol=0)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], schedule.q_sample(x0, t, noise), atol=1e-5, rtol=0)
    assert training_loss(oracle, x0, schedule, parameterization, t=t, noise=noise).loss < 1e-9


def test_min_snr_weight_formula():
    schedule = DiscreteSchedule()
    a = schedule.alphas_cumprod
    snr = a / (1 - a)
    eps_w = min_snr_weight(schedule.sigmas, "eps", 5.0)
    v_w = min_snr_weight(schedule.sigmas, "v", 5.0)
    torch.testing.assert_close(eps_w, snr.clamp(max=5.0) / snr, rtol=1e-4, atol=0)
    torch.testing.assert_close(v_w, snr.clamp(max=5.0) / (snr + 1), rtol=1e-4, atol=0)
    assert eps_w[-1] == 1 and eps_w[0] < 0.01
    assert torch.equal(min_snr_weight(schedule.sigmas, "v", None), torch.ones(1000))


def test_min_snr_weights_per_sample_loss():
    schedule = DiscreteSchedule()
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 300, 900])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = training_loss(zero, x0, schedule, "eps", t=t, noise=noise)
    weighted = training_loss(zero, x0, schedule, "eps", t=t, noise=noise, min_snr_gamma=5.0)
    weight = min_snr_weight(schedule.sigmas[t], "eps", 5.0)
    torch.testing.assert_close(weighted.per_sample, plain.per_sample * weight)
    assert weighted.per_sample[0] < 0.1 * plain.per_sample[0]


def test_offset_noise_is_a_per_sample_channel_shift():
    x0 = torch.zeros(2, 3, 4, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 0.1, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert shift.abs().max() > 0
    # constant over frames and pixels, different across samples and channels
    torch.testing.assert_close(shift, shift[:, :1, :, :1, :1].expand_as(shift))
    assert shift[0, 0, :, 0, 0].unique().numel() == 4
    assert sample_noise(torch.zeros(2, 4, 8, 8), 0.1).shape == (2, 4, 8, 8)


def test_correlate_frames_mixes_in_a_draw_shared_by_each_sample():
    noise = torch.randn(3, 4, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0.0, 0.5, 1.0])
    mixed = correlate_frames(noise, c, torch.Generator().manual_seed(1))
    assert torch.equal(mixed[0], noise[0])  # c = 0: untouched
    torch.testing.assert_close(mixed[2], mixed[2, :1].expand_as(mixed[2]))  # c = 1: one draw
    frames = mixed[1].flatten(1)
    corr = torch.corrcoef(frames)[0, 1:]
    torch.testing.assert_close(corr, torch.full((3,), 0.5), atol=0.03, rtol=0)
    assert frames.std(dim=1).sub(1).abs().max() < 0.03  # every frame stays unit Gaussian


def test_loss_reproducible_from_generator_and_checks_input():
    schedule = DiscreteSchedule()
    x0 = torch.randn(4, 2, 4, 8, 8)
    model = lambda x, t: 0.5 * x  # noqa: E731
    first = training_loss(
        model, x0, schedule, "v", offset_noise=0.1, generator=torch.Generator().manual_seed(7)
    )
    again = training_loss(
        model, x0, schedule, "v", offset_noise=0.1, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(first.loss, again.loss) and torch.equal(first.t, again.t)
    assert first.t.min() >= 0 and first.t.max() < 1000
    with pytest.raises(ValueError, match="parameterization"):
        training_loss(model, x0, schedule, "x0")
    with pytest.raises(ValueError, match="model output shape"):
        training_loss(lambda x, t: x[:, :1], x0, schedule, "eps")
