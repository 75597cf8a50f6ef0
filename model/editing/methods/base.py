"""What an editing method is: the starting noise of an edit's frames and the guided denoiser
of sigma the sampler runs over them (``model.editing.methods`` lists them)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from model.diffusion.samplers import DiscreteDenoiser


class EditMethod(Protocol):
    """An editing method. ``settings`` is an ``EditSettings``; ``model`` implements the
    pipeline's model interface (``model.editing.interface``)."""

    name: str
    needs: str  # what a model must be to run it, for refusals
    frames_independent: bool  # every frame runs alone: no input of one depends on another

    def noise(self, shape: tuple[int, ...], settings: Any, generator) -> torch.Tensor:
        """Unit Gaussian starting noise ``(B, F, C, h, w)`` on the CPU, drawn from
        ``generator``."""
        ...

    def denoiser(self, model: Any, settings: Any, progress: bool = False):
        """The denoiser of sigma the sampler calls as ``d(x, sigma, cond=..., uncond=...)``;
        it has ``windows_seen`` (calls of the model on frame windows)."""
        ...

    def cond_extra(self) -> dict:
        """Keyword arguments the method adds to both guidance branches."""
        ...

    def step_noise(self, shape: tuple[int, ...], generator, device):
        """The ``noise_sampler`` of stochastic samplers (fresh noise each step), or None for
        the sampler's own i.i.d. draws from ``generator``."""
        ...


def model_denoiser(model: Any) -> DiscreteDenoiser:
    """The model's UNet as a denoiser of sigma (eps or v, SD's discrete schedule)."""
    return DiscreteDenoiser(
        model.model_fn(model.sampling_unet()), model.schedule, model.parameterization
    )
