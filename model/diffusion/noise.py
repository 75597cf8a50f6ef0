"""Starting and training noise: Gaussian draws, offset noise, frames that share a part.

Every draw takes a ``torch.Generator`` so that a seed reproduces a result on any device.
"""

from __future__ import annotations

import torch


def sample_noise(
    x0: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise like ``x0``, plus ``offset_noise`` times a per-sample, per-channel offset.

    Offset noise (Guttenberg 2023) lets the model change an image's mean colour. The offset is
    shared by all frames and pixels of a sample: shape (B, 1, C, 1, 1) for videos (B, F, C, H, W).
    """
    device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    if offset_noise:
        shape = [x0.shape[0]] + [1] * (x0.ndim - 1)
        shape[-3] = x0.shape[-3]
        offset = torch.randn(shape, generator=generator, device=device, dtype=x0.dtype)
        noise = noise + offset_noise * offset
    return noise.to(x0.device)


def correlate_frames(
    noise: torch.Tensor, correlation: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Video noise ``(B, F, C, H, W)`` whose frames correlate by ``correlation`` (a number, or
    one per sample ``(B,)``): sqrt(1 - c) times ``noise`` plus sqrt(c) times one draw shared by
    a sample's frames (PYoCo's mixed noise prior). Each frame stays unit Gaussian."""
    device = generator.device if generator is not None else noise.device
    shape = (noise.shape[0], 1, *noise.shape[2:])
    common = torch.randn(shape, generator=generator, device=device, dtype=noise.dtype)
    c = torch.as_tensor(correlation, dtype=noise.dtype, device=noise.device)
    c = c.reshape(-1, *[1] * (noise.ndim - 1)) if c.ndim else c
    return (1 - c).sqrt() * noise + c.sqrt() * common.to(noise.device)


def frame_noise(
    shape: tuple[int, ...], correlation: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unit Gaussian noise ``(B, F, C, h, w)`` whose frames correlate by ``correlation``
    (``correlate_frames``): 0 gives independent frames (exactly
    ``torch.randn(shape)``, so seeds keep their edits), 1 the same noise for every frame."""
    noise = torch.randn(shape, generator=generator)
    return correlate_frames(noise, correlation, generator) if correlation > 0.0 else noise
