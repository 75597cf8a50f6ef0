"""Multi-frame render (the seed's "left the previous frame, right the first frame, inpaint the
middle"; the idea of Rerender-A-Video's and of "multi-frame rendering" in the A1111 scripts):
frame k is generated on a canvas that holds, side by side, already edited frames (the first
output, the previous output) and frame k itself; only frame k's part is edited, by masked
sampling (``model.diffusion.guidance.MaskedDenoiser``: the other parts follow their output
latents noised to each step's sigma), while the conditioning (depth, inpainting channels)
spans the whole canvas, each part its own frame's. Frames are made in sequence; frame 0 is
edited alone. The image model sees one picture in which the new frame must agree with the
frames beside it. Noise, guidance and conditioning are mov2mov's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from model.diffusion.guidance import Release
from model.editing.methods.base import SamplingRun
from model.editing.methods.mov2mov import Mov2Mov

PARTS = ("first", "previous", "current")


def check_canvas(canvas: Sequence[str]) -> tuple[str, ...]:
    """The canvas layout, left to right: names from ``PARTS``, ``current`` exactly once, at
    least one other part; ``ValueError`` otherwise."""
    parts = tuple(str(p) for p in canvas) if not isinstance(canvas, str) else (canvas,)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or parts.count("current") != 1 or len(parts) < 2:
        raise ValueError(
            f"multi_frame.canvas must list parts of {', '.join(PARTS)} with 'current' once and "
            f"at least one other part, got {list(parts)}"
        )
    return parts


def canvas_frames(value, indices: list[int], video_shape: torch.Size, current: int | None = None):
    """Per-frame images shaped like a video of ``video_shape`` (``(B, F, ..., w)``) laid side
    by side along the width as one frame ``(B, 1, ..., len(indices) w)`` of frames
    ``indices``; other per-frame values (a keyframe schedule's context ``(B, F, tokens, D)``
    and guidance scales ``(B, F, 1, 1, 1)``) those of frame ``current``; dicts are walked;
    anything else passes as is."""
    if isinstance(value, torch.Tensor):
        per_frame = value.ndim >= 4 and value.shape[:2] == video_shape[:2]
        spatial = value.ndim == len(video_shape) and tuple(value.shape[-2:]) != (1, 1)
        if per_frame and spatial:  # latents, structure, hints: side by side
            return torch.cat([value[:, i : i + 1] for i in indices], dim=-1)
        if per_frame and current is not None:
            return value[:, current : current + 1]
        return value
    if isinstance(value, Mapping):
        return {k: canvas_frames(v, indices, video_shape, current) for k, v in value.items()}
    return value


def split_part(canvas: torch.Tensor, part: int, width: int) -> torch.Tensor:
    """Part ``part`` (of ``width`` columns) of a canvas ``(..., n width)``."""
    return canvas[..., part * width : (part + 1) * width]


def canvas_noise(draw, indices: list[int], video_shape: torch.Size):
    """A stochastic sampler's ``noise_sampler`` of the video, laid out as the canvas."""
    return lambda sigma, sigma_next: canvas_frames(draw(sigma, sigma_next), indices, video_shape)


class MultiFrame(Mov2Mov):
    """``method=multi_frame``: each frame inpainted on a canvas beside edited frames
    (``settings.canvas``)."""

    name = "multi_frame"
    roles = frozenset({"render"})

    def check(self, settings: Any, num_frames: int | None, masked: bool) -> None:
        """A valid canvas; no user mask (the canvas' own mask is the method)."""
        check_canvas(settings.canvas)
        if masked:
            raise ValueError(
                "method multi_frame edits only the current frame's part of its canvas by its "
                "own mask: it cannot take mask= as well"
            )

    def render(self, run: SamplingRun) -> torch.Tensor:
        """Frame 0 alone, then frame k on the canvas of ``settings.canvas``."""
        parts = check_canvas(run.settings.canvas)
        shape = run.noise.shape
        width = shape[-1]
        at = parts.index("current")
        outputs = [run.frame(0).sample()]
        for k in range(1, shape[1]):
            # A frame kept (a long edit's carried frame) stays; one held for its first steps
            # (keyframed strength, a released overlap) is let go on the canvas as well.
            held = run.mask is not None and not bool(run.mask[:, k].any())
            never = run.release is None or float(run.release.sigma[:, k].max()) < 0
            if held and never:
                outputs.append(run.source[:, k : k + 1])
                continue
            indices = [{"first": 0, "previous": k - 1, "current": k}[p] for p in parts]
            current = run.source[:, k : k + 1] if run.source is not None else None
            if current is None:
                current = torch.zeros_like(run.noise[:, k : k + 1])
            done = {"first": outputs[0], "previous": outputs[k - 1], "current": current}
            source = torch.cat([done[p].to(run.noise.dtype) for p in parts], dim=-1)

            def part_mask(edited: bool):
                return torch.cat(
                    [torch.full_like(run.noise[:, :1, :1], float(edited and p == "current"))
                     for p in parts],
                    dim=-1,
                )  # fmt: skip

            mask = part_mask(not held)
            release = None
            if held:
                sigma = run.release.sigma[:, k : k + 1]
                release = Release(sigma, part_mask(True).to(run.noise.device))
            kwargs = dict(run.sampler_kwargs)
            if "noise_sampler" in kwargs:
                kwargs["noise_sampler"] = canvas_noise(kwargs["noise_sampler"], indices, shape)
            one = replace(
                run,
                noise=canvas_frames(run.noise, indices, shape),
                source=source.to(run.noise.device),
                mask=mask.to(run.noise.device),
                extra_args=canvas_frames(run.extra_args, indices, shape, k),
                sampler_kwargs=kwargs,
                release=release,
            )
            outputs.append(split_part(one.sample(), at, width))
        return torch.cat(outputs, dim=1)

    def describe(self, settings: Any) -> dict:
        return {"canvas": list(check_canvas(settings.canvas))}
