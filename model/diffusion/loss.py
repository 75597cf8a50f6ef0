"""The diffusion training loss: MSE to the eps or v target, optionally min-SNR weighted.

Shares its preconditioning (``get_scalings``) with sampling, so training and sampling see one
parameterisation (k-diffusion's habit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from model.diffusion.noise import sample_noise
from model.diffusion.schedule import (
    DiscreteSchedule,
    append_dims,
    check_parameterization,
    get_scalings,
)


def min_snr_weight(sigma: torch.Tensor, parameterization: str, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023); ones when ``gamma`` is None.

    With ``snr = 1 / sigma^2`` the weight is ``min(snr, gamma) / snr`` on the eps loss and
    ``min(snr, gamma) / (snr + 1)`` on the v loss.
    """
    if gamma is None:
        return torch.ones_like(sigma)
    snr = sigma.pow(-2)
    clipped = snr.clamp(max=gamma)
    return (
        clipped / snr if check_parameterization(parameterization) == "eps" else clipped / (snr + 1)
    )


class TrainingLoss(NamedTuple):
    """The scalar loss, the per-sample (weighted) losses and the timesteps drawn."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    t: torch.Tensor


def training_loss(
    model_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    schedule: DiscreteSchedule,
    parameterization: str = "eps",
    cond: dict | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> TrainingLoss:
    """MSE between ``model_fn(x_t, t, **cond)`` and the parameterisation's target (eps or v).

    ``t`` (B,) defaults to uniform integers in [0, T); ``noise`` defaults to Gaussian noise with
    optional offset noise. ``min_snr_gamma`` turns on min-SNR-gamma weighting.
    """
    batch = x0.shape[0]
    if t is None:
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=device)
    t = t.to(x0.device).long()
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if noise is None:
        noise = sample_noise(x0, offset_noise, generator)
    sigma = schedule.sigmas.to(x0.device)[t]
    c_skip, c_out, c_in = (
        append_dims(c, x0.ndim).to(x0.dtype) for c in get_scalings(sigma, parameterization)
    )
    x = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
    target = (x0 - c_skip * x) / c_out
    output = model_fn(x * c_in, t, **(cond or {}))
    if output.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(output.shape)} != latents {tuple(x0.shape)}")
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(1)
    per_sample = per_sample * min_snr_weight(sigma.float(), parameterization, min_snr_gamma)
    return TrainingLoss(per_sample.mean(), per_sample, t)
