"""Motion-aware starting noise (Text2Video-Zero's motion dynamics, Khachatryan et al. 2023):
frame k starts from the first frame's noise moved along the video's own global motion,
instead of the same draw for every frame (mov2mov) or independent draws.

The motion is estimated from the input frames (``model.editing.methods.motion``: phase
correlation of consecutive frames, summed), rounded to whole latent pixels, and applied
frame after frame: ``noise_k = shift(noise_{k-1}, p_k - p_{k-1})`` with ``p_k`` the rounded
cumulative position, so wherever frame 0's noise is still in view frame k holds it moved by
``p_k`` exactly, and the region the motion uncovers takes a fresh draw that persists in the
frames after. A translation keeps the noise exactly unit Gaussian (no resampling).
Text2Video-Zero applies the shift at an intermediate timestep after DDIM steps of the first
frame; here it is applied to the starting noise itself (the first step's ``x_T``, or the
noise of an SDEdit start), which also follows the input rather than one global direction.
Everything else is mov2mov's.
"""

from __future__ import annotations

from typing import Any

import torch

from model.editing.methods.motion import shift_latents, video_motion
from model.editing.methods.mov2mov import Mov2Mov


def motion_positions(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """The whole-latent-pixel position ``(dy, dx)`` of every frame relative to the first,
    ``(B, F, 2)`` long, from the global motion of ``frames`` ``(B, F, 3, H, W)`` at the
    VAE's ``factor``."""
    return torch.round(video_motion(frames) / factor).long()


def motion_noise(
    shape: tuple[int, ...],
    frames: torch.Tensor,
    generator: torch.Generator | None = None,
    common: torch.Tensor | None = None,
) -> torch.Tensor:
    """Starting noise ``(B, F, C, h, w)``, unit Gaussian per frame: one draw for frame 0
    (``common`` ``(B, 1, C, h, w)`` when given), moved along the motion of ``frames``
    ``(B, F, 3, H, W)`` to every later frame (the uncovered region from fresh draws).
    ``ValueError`` when the frames do not match ``shape``."""
    batch, num_frames, channels, h, w = shape
    if frames.shape[:2] != (batch, num_frames) or frames.shape[-1] % w or frames.shape[-2] % h:
        raise ValueError(f"frames {tuple(frames.shape)} do not match the latents {shape}")
    factor = frames.shape[-1] // w
    positions = motion_positions(frames, factor)
    noise = torch.empty(shape)
    first = torch.randn((batch, channels, h, w), generator=generator)
    noise[:, 0] = common[:, 0] if common is not None else first
    for k in range(1, num_frames):
        fresh = torch.randn((batch, channels, h, w), generator=generator)
        for b in range(batch):
            step = (positions[b, k] - positions[b, k - 1]).tolist()
            noise[b, k] = shift_latents(noise[b, k - 1], step, fill=fresh[b])
    return noise


class MotionNoise(Mov2Mov):
    """``method=motion_noise``: mov2mov from noise that follows the input's global motion."""

    name = "motion_noise"
    roles = frozenset({"noise"})

    def noise(self, shape, settings: Any, generator, frames=None, common=None) -> torch.Tensor:
        """As ``EditMethod.noise`` (``model.editing.methods.base``)."""
        if frames is None:
            raise ValueError("motion_noise follows the input's motion: it needs the frames")
        return motion_noise(shape, frames, generator, common)

    def describe(self, settings: Any) -> dict:
        return {"motion": "phase correlation of consecutive input frames, whole latent pixels"}
