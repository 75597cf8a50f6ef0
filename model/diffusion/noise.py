"""Starting and training noise: Gaussian draws, offset noise, frames that share a part.

Every draw takes a ``torch.Generator`` so that a seed reproduces a result on any device;
``SampleDraws`` gives every sample of a batch its own (a split batch draws as a whole one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
    noise: torch.Tensor,
    correlation: float | torch.Tensor,
    generator: torch.Generator | None = None,
    common: torch.Tensor | None = None,
) -> torch.Tensor:
    """Video noise ``(B, F, C, H, W)`` whose frames correlate by ``correlation`` (a number, or
    one per sample ``(B,)``): sqrt(1 - c) times ``noise`` plus sqrt(c) times one draw shared by
    a sample's frames (PYoCo's mixed noise prior; ``common`` ``(B, 1, C, H, W)`` when given,
    else drawn from ``generator``). Each frame stays unit Gaussian."""
    device = generator.device if generator is not None else noise.device
    shape = (noise.shape[0], 1, *noise.shape[2:])
    if common is None:
        common = torch.randn(shape, generator=generator, device=device, dtype=noise.dtype)
    c = torch.as_tensor(correlation, dtype=noise.dtype, device=noise.device)
    c = c.reshape(-1, *[1] * (noise.ndim - 1)) if c.ndim else c
    return (1 - c).sqrt() * noise + c.sqrt() * common.to(noise.device)


def frame_noise(
    shape: tuple[int, ...],
    correlation: float,
    generator: torch.Generator | None = None,
    common: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit Gaussian noise ``(B, F, C, h, w)`` whose frames correlate by ``correlation``
    (``correlate_frames``, with its shared draw ``common`` when given): 0 gives independent
    frames (exactly ``torch.randn(shape)``, so seeds keep their edits), 1 the same noise for
    every frame."""
    noise = torch.randn(shape, generator=generator)
    if correlation > 0.0:
        return correlate_frames(noise, correlation, generator, common)
    return noise


def sample_seed(*key: int) -> int:
    """A 63-bit seed of integers ``key`` (e.g. run seed, step, place in the batch)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


class SampleDraws:
    """Random draws for a batch in which every sample has a generator of its own.

    Each method draws one value or tensor per sample, in sample order, from that sample's
    generator: what a sample gets depends on its seed and on the draws made before, never on
    which other samples share its batch. So a global batch split over ranks draws, sample for
    sample, what one process draws for it whole (Gen1's training seeds sample j of a step
    from (seed, step, j's place in the global batch)).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    @classmethod
    def from_generator(cls, generator: torch.Generator, batch: int) -> SampleDraws:
        """Per-sample generators seeded from draws of ``generator``, on its device."""
        seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device)
        return cls(seeds.tolist(), generator.device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, *shape)`` standard normal."""
        draws = [
            torch.randn(shape, generator=g, device=self.device, dtype=dtype)
            for g in self.generators
        ]
        return torch.stack(draws)

    def rand(self) -> torch.Tensor:
        """``(B,)`` uniform in [0, 1)."""
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])

    def randint(self, low: int, high: int) -> torch.Tensor:
        """``(B,)`` integers uniform in [low, high)."""
        draws = [
            torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.generators
        ]
        return torch.cat(draws)
