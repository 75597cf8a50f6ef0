"""mov2mov: every frame through the image model on its own, img2img at ``strength`` from one
shared seed, as A1111's mov2mov extensions and Gen-1's "SD frame by frame" baseline do.

The starting noise is one ``(B, 1, C, h, w)`` draw shared by every frame: the first draw from
the generator, so a one-frame edit starts from exactly the noise diffusers'
``StableDiffusionPipeline`` draws for the same seed (``torch.randn((1, 4, h, w),
generator=torch.Generator("cpu").manual_seed(seed))``). Stochastic samplers' fresh noise at
each step is shared by the frames too, so every frame is the one-frame edit of its input
with the same seed. The denoiser is classifier-free
guidance ``w`` with the temporal layers of a video UNet off; frames go through the UNet
``window_length`` at a time (windows without overlap: frames never interact, so the
windows only bound memory), and frame k's output depends on frame k's input alone.
"""

from __future__ import annotations

from typing import Any

import torch

from model.diffusion.guidance import ClassifierFreeGuidance
from model.diffusion.windows import WindowedDenoiser
from model.editing.methods.base import SamplingRun, model_denoiser


class Mov2Mov:
    """``method=mov2mov``: the default method of an SD checkpoint, and the base the other
    training-free methods (``model.editing.methods``) change one part of."""

    name = "mov2mov"
    needs = "an image model (any SD checkpoint, or a Gen-1 UNet with its temporal layers off)"
    roles: frozenset[str] = frozenset()  # the base of every composition
    frames_independent = True

    def noise(self, shape, settings: Any, generator, frames=None, common=None) -> torch.Tensor:
        """As ``EditMethod.noise`` (``model.editing.methods.base``)."""
        batch, count, *rest = shape
        shared = (
            common if common is not None else torch.randn((batch, 1, *rest), generator=generator)
        )
        return shared.expand(batch, count, *rest).contiguous()

    def step_noise(self, shape: tuple[int, ...], generator, device):
        """Stochastic samplers' fresh noise, also one draw shared by every frame."""

        def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
            return self.noise(shape, None, generator).to(device)

        return draw

    def denoiser(self, model: Any, settings: Any, progress: bool = False) -> WindowedDenoiser:
        guided = ClassifierFreeGuidance(model_denoiser(model), settings.w)
        return WindowedDenoiser(guided, settings.window_length, 0, progress=progress)

    def cond_extra(self) -> dict:
        return {"temporal": False}  # a video UNet runs as the image model, frame by frame

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """Nothing to refuse beyond the common settings."""

    def render(self, run: SamplingRun) -> torch.Tensor:
        """All frames in one sampling run."""
        return run.sample()

    def describe(self, settings: Any) -> dict:
        """No settings of its own."""
        return {}
