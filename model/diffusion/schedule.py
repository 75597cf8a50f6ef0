"""Stable Diffusion's discrete noise schedule and its eps / v parameterisations.

Two views of the same forward process are used:

* DDPM (the model's own space): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` at integer ``t``,
  with ``a_t = alphas_cumprod[t]``.
* Karras / k-diffusion (the samplers' space): ``x = x0 + sigma noise`` with
  ``sigma_t = sqrt((1 - a_t) / a_t)``, so ``x_t = x / sqrt(1 + sigma^2)``.

``get_scalings`` is the one preconditioning shared by training (``model.diffusion.loss``) and
sampling (``model.diffusion.samplers.DiscreteDenoiser``): the denoised estimate is
``c_skip x + c_out F(c_in x, t)`` and the model's regression target is
``(x0 - c_skip x) / c_out``, which is ``noise`` for eps and ``sqrt(a) noise - sqrt(1 - a) x0``
for v.
"""

from __future__ import annotations

import torch

PARAMETERIZATIONS = ("eps", "v")

# Zero terminal SNR makes the last alpha_cumprod exactly 0 and its sigma infinite. As diffusers
# does for sampling, alpha_cumprod is floored here (sigma_max about 4096), for training too, so
# that q_sample, the loss and the samplers see one schedule; the signal left at t = T - 1,
# sqrt(2^-24) x0 = 2.4e-4 x0, is below bf16 resolution.
ZERO_SNR_ALPHA_FLOOR = 2.0**-24


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to ``x`` (e.g. per-sample sigma (B,)) up to ``ndim``."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a number or ``(B,)``) expanded to ``(B,)`` for ``x``'s batch, or, given per
    frame of a video ``x`` ``(B, F, C, h, w)`` as ``(B or 1, F)``, to ``(B, F)``: every frame
    at its own noise level (``model.editing.diagonal``: frames queued at staggered levels)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 2:
        if x.ndim != 5:
            raise ValueError(f"a sigma per frame (B, F) needs a video, got x {tuple(x.shape)}")
        return sigma.expand(x.shape[0], x.shape[1])
    return sigma.expand(x.shape[0])


def check_parameterization(parameterization: str) -> str:
    """Return ``parameterization`` if it is one we know, else raise naming the choices."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )
    return parameterization


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR, the first unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.
    """
    sqrt_a = alphas_cumprod.sqrt()
    first, last = sqrt_a[0].clone(), sqrt_a[-1].clone()
    sqrt_a = (sqrt_a - last) * first / (first - last)
    return sqrt_a**2


class DiscreteSchedule:
    """SD's discrete DDPM schedule: scaled-linear betas, ``alphas_cumprod`` and the matching sigmas.

    ``sigma_to_t`` / ``t_to_sigma`` map between continuous noise levels and (fractional) timestep
    indices by linear interpolation in log-sigma, as k-diffusion's ``DiscreteSchedule`` does.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.num_timesteps = num_timesteps
        self.zero_terminal_snr = zero_terminal_snr
        # Computed in float64 and stored in float32, as the original ldm code does.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas**2, dim=0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            alphas_cumprod = alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_FLOOR)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        """The smallest noise level the model was trained on (t = 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest noise level the model was trained on (t = T - 1)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Timestep of ``sigma``: the nearest integer (in log sigma) or log-linear interpolation."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log().reshape(1, -1)
        dists = log_sigma - log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        w = (log_sigmas[low] - log_sigma[0]) / (log_sigmas[low] - log_sigmas[low + 1])
        w = w.clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (fractional) timestep ``t``, interpolating log sigma between integers."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising in DDPM space: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` for ``t`` (B,)."""
        a = append_dims(self.alphas_cumprod.to(x0.device)[t.long()], x0.ndim).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def get_scalings(
    sigma: torch.Tensor, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in)`` so that ``x0 ~ c_skip x + c_out model(c_in x, t)`` at ``sigma``.

    eps: ``x0 = x - s eps``; v (sigma_data = 1): ``x0 = x / (1 + s^2) - s / sqrt(1 + s^2) v``
    (Salimans & Ho 2022; Karras et al. 2022, table 1). Both feed the model ``x / sqrt(1 + s^2)``.
    """
    c_in = (sigma**2 + 1).rsqrt()
    if check_parameterization(parameterization) == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    return c_in**2, -sigma * c_in, c_in
