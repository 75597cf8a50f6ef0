"""Samplers in k-diffusion's convention: a denoiser of sigma, sigma schedules, one function each.

A sampler sees ``denoiser(x, sigma, **extra_args) -> x0`` with ``x = x0 + sigma * noise`` and
``sigma`` of shape (B,). ``DiscreteDenoiser`` wraps SD's discrete eps / v UNet into one.
Every sampler has the signature
``sample_xxx(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, ...)``;
``sigmas`` is decreasing and ends with 0, ``x`` starts at noise level ``sigmas[0]``; ``callback``
gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per step; ``disable`` turns the tqdm
bar off. Stochastic samplers draw noise from ``noise_sampler(sigma, sigma_next)`` when given,
else from ``generator``, so a seed reproduces a result.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from tqdm.auto import trange

from model.diffusion.schedule import (
    DiscreteSchedule,
    append_dims,
    batch_sigma,
    check_parameterization,
    get_scalings,
)

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DiscreteDenoiser:
    """SD's discrete eps- or v-model seen as a denoiser of sigma: ``x0 = c_skip x + c_out F``.

    Calls ``model_fn(x * c_in, t, **kwargs)``; ``quantize`` rounds ``t`` to the nearest trained
    timestep (k-diffusion's ``quantize=True``, what diffusers' DPM++ does), else interpolates.
    """

    def __init__(
        self,
        model_fn: Callable[..., torch.Tensor],
        schedule: DiscreteSchedule,
        parameterization: str = "eps",
        quantize: bool = True,
    ) -> None:
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = check_parameterization(parameterization)
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)  # (B,), or (B, F): a noise level per frame
        c_skip, c_out, c_in = (
            append_dims(c, x.ndim) for c in get_scalings(sigma, self.parameterization)
        )
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        return c_skip * x + c_out * self.model_fn(x * c_in, t, **kwargs)


# --- sigma schedules ---------------------------------------------------------------------

SCHEDULES = ("karras", "exponential", "leading", "trailing")


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5): ``n`` sigmas uniform in ``sigma^(1/rho)``, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """``n`` sigmas uniform in log sigma (constant DPM-Solver step h), then a final 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def discrete_timesteps(
    schedule: DiscreteSchedule, n: int, spacing: str = "leading", steps_offset: int = 1
) -> torch.Tensor:
    """Diffusers' integer timesteps (decreasing): "leading" ``i * (T // n) + steps_offset`` or
    "trailing" ``round(T - i T / n) - 1`` (Lin et al. 2024, table 2)."""
    T = schedule.num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"number of steps must be in [1, {T}], got {n}")
    if spacing == "leading":
        timesteps = torch.arange(n - 1, -1, -1) * (T // n) + steps_offset
        if timesteps[0] >= T:  # e.g. n = T with SD's steps_offset = 1: diffusers indexes t = T
            raise ValueError(
                f"'leading' spacing with {n} steps and steps_offset={steps_offset} reaches "
                f"t={int(timesteps[0])} >= {T}; use fewer steps, steps_offset=0 or 'trailing'"
            )
        return timesteps
    if spacing == "trailing":
        return torch.arange(T, 0, -T / n, dtype=torch.float64).round().long()[:n] - 1
    raise ValueError(f"unknown discrete spacing {spacing!r}; expected 'leading' or 'trailing'")


def get_sigmas(
    name: str,
    n: int,
    schedule: DiscreteSchedule,
    *,
    rho: float = 7.0,
    steps_offset: int = 1,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``n + 1`` sigmas (ending at 0) of schedule ``name``: karras, exponential, leading, trailing.

    Karras and exponential span the model's own [sigma_min, sigma_max].
    """
    if name == "karras":
        return get_sigmas_karras(n, schedule.sigma_min, schedule.sigma_max, rho, device)
    if name == "exponential":
        return get_sigmas_exponential(n, schedule.sigma_min, schedule.sigma_max, device)
    if name in ("leading", "trailing"):
        sigmas = schedule.sigmas[discrete_timesteps(schedule, n, name, steps_offset)]
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)
    raise ValueError(f"unknown sigma schedule {name!r}; expected one of {SCHEDULES}")


# --- samplers ----------------------------------------------------------------------------


def _noise_source(
    x: torch.Tensor, noise_sampler: NoiseSampler | None, generator: torch.Generator | None
) -> NoiseSampler:
    """The given noise sampler, or i.i.d. normal noise from ``generator`` (on its device)."""
    if noise_sampler is not None:
        return noise_sampler
    device = generator.device if generator is not None else x.device

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        return noise.to(x.device)

    return draw


def ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step to ``sigma_next`` into a deterministic one to ``sigma_down`` plus fresh noise
    ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_next^2); eta = 1 is DDPM's posterior noise."""
    var_up = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    sigma_up = torch.minimum(sigma_next, eta * var_up.clamp(min=0).sqrt())
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


def _report(callback, x, i, sigma, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler steps on the probability-flow ODE ``dx/dsigma = (x - D(x)) / sigma``.

    Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".
    """
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    generator=None,
):
    """Euler step down to ``sigma_down``, then fresh noise up to ``sigma_next`` (ancestral).

    Ho et al. 2020 (DDPM ancestral sampling) in the sigma form of Karras et al. 2022.
    """
    extra_args = extra_args or {}
    noise_sampler = _noise_source(x, noise_sampler, generator)
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


HEUN_MAX_RATIO = 10.0  # longest step (sigma / sigma_next) that Heun corrects


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's second-order method on the probability-flow ODE (Euler on the last step).

    Karras et al. 2022, algorithm 1 (without churn). A step across more than a decade of
    sigma (``sigma / sigma_next > HEUN_MAX_RATIO``, only at a handful of steps: 2-4 with the
    Karras schedule) is taken as Euler: the trapezoidal correction averages the slopes at both
    ends, which differ by orders of magnitude there, and overshoots (at 2 steps the output is
    decoded noise, 60x the data's spread on a Gaussian test). The same reasoning as DPM-Solver's
    lower-order final steps; k-diffusion's heun is unchanged wherever no step is that long.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        d = (x - denoised) / sigma
        if sigma_next == 0 or sigma > HEUN_MAX_RATIO * sigma_next:
            x = x + d * (sigma_next - sigma)
            continue
        x_euler = x + d * (sigma_next - sigma)
        d_next = (x_euler - denoiser(x_euler, sigma_next * s_in, **extra_args)) / sigma_next
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): second-order multistep in ``lambda = -log(sigma)`` on x0 predictions.

    Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling ...", algorithm 2.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    noise_sampler=None,
    generator=None,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE: the multistep solver of the reverse SDE, noise scaled by ``eta``.

    Lu et al. 2022 (DPM-Solver++), section 5 / appendix; ``solver_type`` "midpoint" or "heun".
    Default noise is i.i.d. per step (k-diffusion's default is a Brownian tree).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    noise_sampler = _noise_source(x, noise_sampler, generator)
    s_in = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        phi = -torch.expm1(-h - eta_h)
        x = (sigma_next / sigma) * (-eta_h).exp() * x + phi * denoised
        if old_denoised is not None:
            coef = 0.5 * phi if solver_type == "midpoint" else 1 - phi / (h + eta_h)
            x = x + coef * (h / h_last) * (denoised - old_denoised)
        if eta:
            noise = noise_sampler(sigma, sigma_next)
            x = x + noise * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_ddim(
    denoiser,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=0.0,
    noise_sampler=None,
    generator=None,
):
    """DDIM (Song et al. 2021, eqs. 12 and 16) written in sigma space.

    Dividing eq. 12 by ``sqrt(alpha_prev)``: ``x_next = x0 + sigma_down eps + sigma_up z`` where
    DDIM's ``sigma_t(eta) / sqrt(alpha_prev)`` is exactly the ancestral ``sigma_up``. eta = 0 is
    Euler on DDIM's own sigmas; eta = 1 is DDPM ancestral sampling.
    """
    extra_args = extra_args or {}
    noise_sampler = _noise_source(x, noise_sampler, generator)
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, desc="steps", disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, denoised)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if eta and sigma_next > 0:
            x = x + sigma_up * noise_sampler(sigma, sigma_next)
    return x


# --- registry ----------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddim": sample_ddim,
}
ALIASES = {"euler_ancestral": "euler_a", "k_euler": "euler", "k_euler_a": "euler_a"}
# The sigma schedule a sampler gets when its name does not say one. DDIM takes "trailing"
# spacing, which starts at the last trained timestep at any step count (Lin et al. 2024,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"): SD's "leading" spacing
# starts at t = 1 for one step and at t = 501 for two, so few-step samples stay noise.
DEFAULT_SCHEDULES = {name: "karras" for name in SAMPLERS} | {"ddim": "trailing"}


def sampler_names() -> list[str]:
    """Every name ``resolve_sampler`` accepts: samplers, aliases, and each with a schedule
    suffix (``dpmpp_2m_karras``, ``ddim_trailing``, ...)."""
    bases = [*SAMPLERS, *ALIASES]
    return bases + [f"{base}_{schedule}" for base in SAMPLERS for schedule in SCHEDULES]


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function for ``name`` ("ddim", "euler", "euler_a", "heun", "dpmpp_2m", ...)."""
    key = ALIASES.get(name, name.removeprefix("sample_"))
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(sampler_names())}")
    return SAMPLERS[key]


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[Callable, str]:
    """``(sampler, schedule name)`` from "dpmpp_2m" + "karras" or one name "dpmpp_2m_karras"."""
    for suffix in SCHEDULES:
        if schedule is None and name.endswith("_" + suffix):
            name, schedule = name.removesuffix("_" + suffix), suffix
    sampler = get_sampler(name)
    schedule = schedule or DEFAULT_SCHEDULES[ALIASES.get(name, name.removeprefix("sample_"))]
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown sigma schedule {schedule!r}; expected one of {SCHEDULES}")
    return sampler, schedule


def sampler_kwargs(sampler: Callable, eta: float | None, generator) -> dict:
    """The keyword arguments ``sampler`` takes for ``generator`` and ``eta``; ValueError when an
    ``eta`` is given to a deterministic sampler."""
    params = inspect.signature(sampler).parameters
    kwargs = {"generator": generator} if "generator" in params else {}
    if eta is not None:
        if "eta" not in params:
            raise ValueError(f"sampler {sampler.__name__} is deterministic: it takes no eta")
        kwargs["eta"] = eta
    return kwargs
