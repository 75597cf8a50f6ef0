"""Previous-frame start: frame k runs its SDEdit steps (Meng et al. 2022) from the previous
output frame instead of from its own source, optionally moved by the input's estimated global
motion between the two frames (``warp``); frames are made in sequence. Frame 0 starts from its
own source. Inside a mask the start is the previous output, outside it the frame's own source
(which masked editing keeps). Noise, guidance and conditioning (each frame's own) are
mov2mov's. An idea of this project's seed; it needs ``strength < 1``: at 1 the start is pure
noise and the previous frame would be lost.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from model.editing.methods.base import SamplingRun
from model.editing.methods.motion import shift_latents
from model.editing.methods.motion_noise import motion_positions
from model.editing.methods.mov2mov import Mov2Mov


class PrevFrame(Mov2Mov):
    """``method=prev_frame``: each frame's SDEdit start is the previous output (``warp``:
    moved by the estimated motion)."""

    name = "prev_frame"
    roles = frozenset({"render"})

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """Refuses ``strength`` 1 (nothing of the previous frame would survive the start)."""
        if settings.strength >= 1.0:
            raise ValueError(
                "method prev_frame starts each frame's SDEdit steps from the previous output: "
                f"it needs strength < 1 (got {settings.strength:g})"
            )

    def render(self, run: SamplingRun) -> torch.Tensor:
        """Frames in sequence, frame k's ``source`` replaced by output k - 1 (warped)."""
        if run.source is None:
            raise ValueError("prev_frame needs the source latents (strength < 1)")
        num_frames, factor = run.noise.shape[1], run.factor
        positions = motion_positions(run.frames, factor) if run.settings.warp else None
        to_clean = (1 + run.sigmas[-1] ** 2).sqrt() if run.sigmas[-1] > 0 else 1.0
        outputs: list[torch.Tensor] = []
        for k in range(num_frames):
            one = run.frame(k)
            if k > 0:
                start = outputs[-1] / to_clean  # back to clean latents if the run ends noisy
                if positions is not None:
                    start = torch.cat([
                        shift_latents(start[b], (positions[b, k] - positions[b, k - 1]).tolist(),
                                      fill=one.source[b])
                        for b in range(start.shape[0])
                    ])  # fmt: skip
                    start = start.view_as(one.source)
                if one.mask is not None:
                    start = one.mask * start + (1 - one.mask) * one.source
                one = replace(one, source=start)
            outputs.append(one.sample())
        return torch.cat(outputs, dim=1)

    def describe(self, settings: Any) -> dict:
        return {"warp": bool(settings.warp)}
