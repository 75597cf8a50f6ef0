"""What an editing method is: the starting noise of an edit's frames, the guided denoiser of
sigma the sampler runs over them, and how the sampling run is rendered (all frames at once, or
frame after frame); ``model.editing.methods`` lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from model.diffusion.guidance import Release, sample
from model.diffusion.samplers import DiscreteDenoiser
from model.diffusion.windows import slice_frames


class EditMethod(Protocol):
    """An editing method. ``settings`` is an ``EditSettings``; ``model`` implements the
    pipeline's model interface (``model.editing.interface``)."""

    name: str
    needs: str  # what a model must be to run it, for refusals
    frames_independent: bool  # every frame's conditioning is its own (no clip-wide inputs)
    roles: frozenset[str]  # what it decides, for compositions: noise, denoiser, render

    def noise(
        self,
        shape: tuple[int, ...],
        settings: Any,
        generator,
        frames: torch.Tensor | None = None,
        common: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit Gaussian starting noise ``(B, F, C, h, w)`` on the CPU, drawn from
        ``generator``; ``frames`` ``(B, F, 3, H, W)`` in [-1, 1] are the input (for methods
        that follow its motion); ``common`` ``(B, 1, C, h, w)``, when given, is the part the
        frames share (a long edit's, the same in every window) instead of a fresh draw."""
        ...

    def denoiser(self, model: Any, settings: Any, progress: bool = False):
        """The denoiser of sigma the sampler calls as ``d(x, sigma, cond=..., uncond=...)``;
        it has ``windows_seen`` (calls of the model on frame windows) and ``overlap``."""
        ...

    def cond_extra(self) -> dict:
        """Keyword arguments the method adds to both guidance branches."""
        ...

    def step_noise(self, shape: tuple[int, ...], generator, device):
        """The ``noise_sampler`` of stochastic samplers (fresh noise each step), or None for
        the sampler's own i.i.d. draws from ``generator``."""
        ...

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """Raise ``ValueError`` (one line) for settings the method cannot run with, before
        any compute: ``num_frames`` of the edit (None: not known yet), ``masked`` whether a
        mask is given."""
        ...

    def render(self, run: SamplingRun) -> torch.Tensor:
        """The edit's latents ``(B, F, C, h, w)``: ``run.sample()`` (all frames in one
        sampling run) or a sequence of runs over parts of the video."""
        ...

    def describe(self, settings: Any) -> dict:
        """The method's own settings as plain data, for an edit's sidecar."""
        ...


@dataclass
class SamplingRun:
    """Everything one sampling run of an edit takes (``model.diffusion.guidance.sample``'s
    arguments), so that a method can render a video in several runs: ``noise``, ``source``
    and ``mask`` are ``(B, F, C or 1, h, w)`` latents (``source`` None at strength 1 without a
    mask), ``frames`` the input ``(B, F, 3, H, W)`` in [-1, 1] on the CPU, ``factor`` the
    VAE's downsampling factor. ``info`` collects what a method reports (for the sidecar)."""

    sampler: Callable
    denoiser: Callable
    noise: torch.Tensor
    sigmas: torch.Tensor
    source: torch.Tensor | None
    strength: float
    mask: torch.Tensor | None
    extra_args: dict
    sampler_kwargs: dict
    frames: torch.Tensor
    factor: int
    settings: Any
    disable: bool = True
    info: dict = field(default_factory=dict)
    release: Release | None = None  # when kept frames go (guidance.MaskedDenoiser)

    def sample(self) -> torch.Tensor:
        """One sampling run of the whole video as it stands."""
        return sample(
            self.sampler,
            self.denoiser,
            self.noise,
            self.sigmas,
            source=self.source,
            strength=self.strength,
            mask=self.mask,
            release=self.release,
            extra_args=self.extra_args,
            disable=self.disable,
            **self.sampler_kwargs,
        )

    def frame(self, k: int) -> SamplingRun:
        """The run restricted to frame ``k`` (a one-frame video): noise, source, mask and
        per-frame conditioning sliced; a shared-noise ``noise_sampler`` sliced to that frame."""
        frames = slice(k, k + 1)
        shape = self.noise.shape
        kwargs = dict(self.sampler_kwargs)
        if "noise_sampler" in kwargs:
            draw = kwargs["noise_sampler"]
            kwargs["noise_sampler"] = lambda s, s_next: draw(s, s_next)[:, frames]
        return replace(
            self,
            noise=self.noise[:, frames],
            source=None if self.source is None else self.source[:, frames],
            mask=None if self.mask is None else slice_frames(self.mask, frames, shape),
            release=None if self.release is None else self.release.frames(frames),
            extra_args=slice_frames(self.extra_args, frames, shape),
            sampler_kwargs=kwargs,
            frames=self.frames[:, frames],
        )


def model_denoiser(model: Any, unet: Any = None) -> DiscreteDenoiser:
    """The model's UNet (or ``unet``, a callable standing in for it) as a denoiser of sigma
    (eps or v, SD's discrete schedule)."""
    return DiscreteDenoiser(
        model.model_fn(unet if unet is not None else model.sampling_unet()),
        model.schedule,
        model.parameterization,
    )
