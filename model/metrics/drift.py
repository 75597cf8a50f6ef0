"""Drift of a long edit: how far each stretch of the video has moved from the first.

A long edit drifts when its look creeps from window to window (colours, the subject). Each
block of frames (e.g. one second) is summarised by its colour mean, its colour histogram
and its mean CLIP image embedding, and compared with the first block's; the input video's
own curve is the baseline (what the scene itself changes). Seams between windows are
measured by the flow warp error across them against that inside windows
(``model.metrics.video.warp_error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.metrics.video import _check_frames, flow_valid_mask, target_coordinates


@dataclass
class DriftCurve:
    """Per block of ``block`` frames, its distance to the first block: ``colour`` (L2 of
    the mean RGB, pixel values in [0, 1]), ``histogram`` (total variation of the 3 x ``bins``
    colour histograms, in [0, 1]), ``clip`` (1 - cosine of the mean CLIP embeddings; None
    without a CLIP model). ``start`` the first frame of each block."""

    start: list[int]
    colour: list[float]
    histogram: list[float]
    clip: list[float] | None


def colour_histogram(frames: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Normalised per-channel histograms ``(3, bins)`` (each row sums to 1) of frames
    ``(F, 3, H, W)`` in [-1, 1]."""
    _check_frames(frames)
    unit = ((frames.float().clamp(-1, 1) + 1) / 2).transpose(0, 1).flatten(1)  # (3, N)
    index = (unit * bins).long().clamp(max=bins - 1)
    counts = torch.zeros(3, bins).scatter_add_(1, index.cpu(), torch.ones_like(unit.cpu()))
    return counts / counts.sum(1, keepdim=True)


def drift_curve(
    frames: torch.Tensor, block: int, clip=None, bins: int = 16, chunk_size: int = 32
) -> DriftCurve:
    """The drift of ``frames`` ``(F, 3, H, W)`` in [-1, 1], block by block of ``block``
    frames (the last block may be shorter), against the first block (its own distance, 0,
    included). ``clip`` (``model.encoders.clip``'s ``encode_image``) adds the embedding
    distance; it runs ``chunk_size`` frames at a time. ``ValueError`` for ``block < 1``."""
    _check_frames(frames)
    if block < 1:
        raise ValueError(f"block must be >= 1 frame, got {block}")
    starts = list(range(0, frames.shape[0], block))
    means, hists, embeds = [], [], []
    for s in starts:
        part = frames[s : s + block].float()
        means.append(((part + 1) / 2).mean(dim=(0, 2, 3)).cpu())
        hists.append(colour_histogram(part, bins))
        if clip is not None:
            device = next(clip.parameters()).device
            parts = [
                clip.encode_image(part[c : c + chunk_size].to(device)).float().cpu()
                for c in range(0, len(part), chunk_size)
            ]
            embeds.append(F.normalize(torch.cat(parts).mean(0), dim=-1))
    colour = [float((m - means[0]).norm()) for m in means]
    histogram = [float((h - hists[0]).abs().sum(1).mean() / 2) for h in hists]
    clip_drift = [float(1 - (e * embeds[0]).sum()) for e in embeds] if clip is not None else None
    return DriftCurve(starts, colour, histogram, clip_drift)


def pair_warp_errors(
    frames: torch.Tensor, flow: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Warp error of every consecutive pair, ``(F - 1,)``: as ``warp_error`` (mean squared
    colour difference, pixels in [-1, 1], over ``valid`` pixels), pair by pair; NaN for a
    pair with no valid pixel."""
    _check_frames(frames, min_frames=2)
    n, h, w = frames.shape[0] - 1, *frames.shape[-2:]
    if flow.shape != (n, 2, h, w):
        raise ValueError(f"flow must be (F-1, 2, H, W) = {(n, 2, h, w)}, got {tuple(flow.shape)}")
    frames, flow = frames.float(), flow.float().to(frames.device)
    x, y = target_coordinates(flow)
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)
    warped = F.grid_sample(
        frames[1:], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    error = (warped - frames[:-1]).square().mean(1)
    valid = flow_valid_mask(flow) if valid is None else valid.to(error.device).bool()
    counts = valid.flatten(1).sum(1)
    sums = (error * valid).flatten(1).sum(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan).cpu()


def seam_warp_error(
    pair_errors: torch.Tensor, windows: list[tuple[int, int]]
) -> tuple[float, float]:
    """``(across seams, inside windows)``: the mean of ``pair_errors`` ``(F - 1,)`` over the
    pairs whose second frame begins a window (``windows``: ``[start, stop)`` of the frames
    each window made), and over all other pairs. NaN pairs are left out."""
    seams = torch.zeros(len(pair_errors), dtype=torch.bool)
    for start, _ in windows[1:]:
        seams[start - 1] = True
    known = ~pair_errors.isnan()
    across = pair_errors[seams & known]
    inside = pair_errors[~seams & known]
    return float(across.mean()), float(inside.mean())


def periodic_step(pair_errors: torch.Tensor, max_period: int = 8) -> tuple[float, int, int]:
    """The strongest periodic step in a video's pair warp errors ``(F - 1,)``: for every
    period ``P`` in ``[2, max_period]`` and phase ``k < P``, the mean error of pairs ``i``
    with ``i % P == k`` over the mean of all pairs; the largest, with its ``P`` and ``k``.
    Seams of any periodic origin show here (a sequential edit's windows: P = the new
    frames per window; a queue whose frames share levels in groups: P = the group), about
    1 when nothing repeats (above 1 by the noise of the largest of many means). NaN pairs
    are left out; ``ValueError`` for fewer than ``2 * max_period`` pairs."""
    if len(pair_errors) < 2 * max_period:
        raise ValueError(f"need at least {2 * max_period} frame pairs, got {len(pair_errors)}")
    known = ~pair_errors.isnan()
    overall = float(pair_errors[known].mean())
    best = (0.0, 0, 0)
    index = torch.arange(len(pair_errors))
    for period in range(2, max_period + 1):
        for phase in range(period):
            at = (index % period == phase) & known
            ratio = float(pair_errors[at].mean()) / overall
            best = max(best, (ratio, period, phase))
    return best
