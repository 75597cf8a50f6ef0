"""ControlNet units at sampling time: which nets act on which step, at what scale.

A unit is one ControlNet with its hint, ``scale`` (diffusers' ``controlnet_conditioning_scale``,
A1111's "control weight") and the fraction of the run's steps it acts on, ``[start, end]``
(diffusers' ``control_guidance_start`` / ``control_guidance_end``: step i of n acts when
``i / n >= start`` and ``(i + 1) / n <= end``). The residuals of the active units are scaled
and summed, as diffusers' ``MultiControlNetModel`` sums them, and the UNet adds the sum to its
skip connections (``UNet.forward(control=...)``). Both guidance branches get the control (the
unconditional one with its own text), as diffusers does outside guess mode.

The hints travel with the other conditioning as one tensor ``(B, F, sum of hint channels, H, W)``
so that temporal windows and guidance batching slice and stack them like any input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from einops import repeat

from model.nets.controlnet import ControlNet


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet with its ``hint`` ``(B, F, hint_channels, H, W)`` in [0, 1] at the
    frames' pixel size (``model.encoders.hints``), ``scale`` >= 0 and the step fraction
    ``0 <= start < end <= 1``."""

    net: ControlNet
    hint: torch.Tensor = field(compare=False, repr=False)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    label: str = ""

    def __post_init__(self) -> None:
        if self.hint.ndim != 5 or self.hint.shape[2] != self.net.hint_channels:
            raise ValueError(
                f"ControlNet {self.label} hint must be (B, F, {self.net.hint_channels}, H, W), "
                f"got {tuple(self.hint.shape)}"
            )
        if self.scale < 0:
            raise ValueError(f"ControlNet {self.label} scale must be >= 0, got {self.scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"ControlNet {self.label} start/end must satisfy 0 <= start < end <= 1, "
                f"got {self.start}, {self.end}"
            )


@dataclass(frozen=True)
class Control:
    """The units of an edit and the run's step timesteps ``(n,)`` (descending; None: every
    unit acts on every step)."""

    units: tuple[ControlUnit, ...]
    timesteps: torch.Tensor | None = field(default=None, compare=False)

    def stacked_hints(self) -> torch.Tensor:
        """The units' hints stacked on channels: ``(B, F, sum of hint channels, H, W)``."""
        return torch.cat([u.hint.float() for u in self.units], dim=2)

    def for_steps(self, timesteps: torch.Tensor) -> Control:
        """This control for a run whose steps start at ``timesteps`` ``(n,)``."""
        return dataclasses.replace(self, timesteps=timesteps.detach().float().cpu())

    def acting(self, unit: ControlUnit, t: torch.Tensor) -> torch.Tensor:
        """Whether ``unit`` acts on each row of timesteps ``t`` ``(N,)``: a bool tensor."""
        if self.timesteps is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        values = t.detach().float().cpu()
        flags = {float(v): self.active(unit, float(v)) for v in values.unique()}
        return torch.tensor([flags[float(v)] for v in values], device=t.device)

    def active(self, unit: ControlUnit, t: float) -> bool:
        """Whether ``unit`` acts at timestep ``t`` (a step's start, or inside it)."""
        if self.timesteps is None:
            return True
        n = len(self.timesteps)
        step = int((self.timesteps > t + 1e-3).sum())  # step i starts at timesteps[i]
        return step / n >= unit.start and (step + 1) / n <= unit.end

    def residuals(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None,
        hints: torch.Tensor,
    ) -> list[torch.Tensor] | None:
        """The summed, scaled residuals for latents ``x`` ``(B, F, C, h, w)`` at timesteps
        ``t`` ``(B,)`` (or per frame ``(B, F)``: a unit acts on the frames at its steps) with
        ``context`` ``(B, tokens, D)`` and ``hints`` ``(B, F, sum C_hint, H, W)``, frames
        folded into the batch ``(B F, ...)`` as ``UNet.forward`` takes them; None when no
        unit acts at this step. Images ``(B, C, h, w)`` with hints ``(B, sum C_hint, H, W)``
        are one-frame videos."""
        if x.ndim == 4:
            x, hints = x[:, None], hints[:, None] if hints.ndim == 4 else hints
        batch, frames = x.shape[:2]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 2:  # per frame (B, F): frames at their own step (a diagonal edit)
            flat_t = t.expand(batch, frames).flatten()
        else:
            flat_t = repeat(t.expand(batch), "b -> (b f)", f=frames)
        flat_x = x.flatten(0, 1)
        if context is not None and context.ndim == 4:  # per frame (B, F, tokens, D)
            flat_context = context.flatten(0, 1)
        else:
            flat_context = None if context is None else context.repeat_interleave(frames, dim=0)
        flat_hints = hints.flatten(0, 1)
        total, offset = None, 0
        for unit in self.units:
            channels = unit.net.hint_channels
            hint = flat_hints[:, offset : offset + channels]
            offset += channels
            acting = self.acting(unit, flat_t)
            if unit.scale == 0 or not acting.any():
                continue
            latents = flat_x[:, : unit.net.in_channels]  # a ControlNet reads the plain latents
            out = unit.net(latents, flat_t, flat_context, hint)
            if acting.all():
                scaled = [unit.scale * r for r in out]
            else:  # frames at other steps than the unit's: no residual there
                gate = unit.scale * acting.to(out[0]).view(-1, 1, 1, 1)
                scaled = [gate * r for r in out]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
        return total
