"""The Gen-1 video model as an editing method: all frames denoised together by the video
UNet over overlapping temporal windows, with Gen-1's content and temporal guidance (Esser et
al. 2023, eq. 7), from PYoCo-mixed noise (``noise_correlation``: 0 independent frames, 1 one
noise for all)."""

from __future__ import annotations

from typing import Any

import torch

from model.diffusion.guidance import Gen1Guidance
from model.diffusion.noise import frame_noise
from model.diffusion.windows import WindowedDenoiser
from model.editing.methods.base import SamplingRun, model_denoiser


class Gen1Method:
    """``method=gen1``: the default of a Gen-1 checkpoint."""

    name = "gen1"
    needs = "a Gen-1 model: a video UNet conditioned on a CLIP content embedding"
    roles: frozenset[str] = frozenset({"noise", "denoiser"})
    frames_independent = False

    def noise(self, shape, settings: Any, generator, frames=None, common=None) -> torch.Tensor:
        """As ``EditMethod.noise`` (``model.editing.methods.base``)."""
        return frame_noise(shape, settings.noise_correlation, generator, common)

    def denoiser(self, model: Any, settings: Any, progress: bool = False) -> WindowedDenoiser:
        return WindowedDenoiser(
            Gen1Guidance(model_denoiser(model), settings.w, settings.w_t),
            settings.window_length,
            settings.window_overlap,
            progress=progress,
        )

    def cond_extra(self) -> dict:
        return {}  # Gen1Guidance sets ``temporal`` per branch

    def step_noise(self, shape: tuple[int, ...], generator, device):
        return None  # the sampler's own draws: every frame its own noise

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """Nothing to refuse beyond the common settings."""

    def render(self, run: SamplingRun) -> torch.Tensor:
        """All frames in one sampling run."""
        return run.sample()

    def describe(self, settings: Any) -> dict:
        """Its guidance and noise settings."""
        return {"w_t": settings.w_t, "noise_correlation": settings.noise_correlation}
