"""Overlapping temporal windows: a denoiser of sigma for videos longer than the model's clip.

The video UNet sees at most ``length`` frames at a time (its temporal attention was trained on
clips of that length, and its activations grow with the frame count). ``WindowedDenoiser``
runs the wrapped denoiser on overlapping windows of frames, one after another, and blends the
x0 predictions of the windows at every sampler step, weighting each window's frames by a ramp
that tapers toward the window's inner edges. Every step thereby sees one consistent video;
memory is that of one window whatever the length of the video.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from model.diffusion.samplers import Denoiser


def window_slices(num_frames: int, length: int, overlap: int) -> list[slice]:
    """Frame windows of ``length`` frames covering ``[0, num_frames)``, consecutive ones sharing
    at least ``overlap`` frames; the last is aligned to the end, so every window is full length.
    A video no longer than ``length`` is one window."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    if not 0 <= overlap < length:
        raise ValueError(f"window overlap must be in [0, length={length}), got {overlap}")
    if num_frames <= length:
        return [slice(0, num_frames)]
    starts = list(range(0, num_frames - length + 1, length - overlap))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return [slice(s, s + length) for s in starts]


def taper_weights(
    length: int, overlap: int, left: bool, right: bool, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Blending weights ``(length,)`` of one window: 1 inside, ramping down linearly over
    ``overlap`` frames at an edge shared with a neighbour (``left`` / ``right``); positive
    everywhere, so every frame keeps a weight. A video's first and last frames are no edge."""
    weights = torch.ones(length, device=device)
    ramp = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
    if left and overlap:
        weights[:overlap] = torch.minimum(weights[:overlap], ramp)
    if right and overlap:
        weights[length - overlap :] = torch.minimum(weights[length - overlap :], ramp.flip(0))
    return weights


def slice_frames(value, frames: slice, video_shape: torch.Size):
    """``value`` restricted to ``frames``: per-frame tensors (batch and frame count first,
    four dimensions or more: a video's latents and conditioning, a per-frame context ``(B, F,
    tokens, D)``) are sliced on dim 1; dicts are walked; all else passes (a clip's context
    ``(B, tokens, D)`` has three)."""
    if isinstance(value, torch.Tensor):
        if value.ndim >= 4 and value.shape[:2] == video_shape[:2]:
            return value[:, frames]
        return value
    if isinstance(value, Mapping):
        return {k: slice_frames(v, frames, video_shape) for k, v in value.items()}
    return value


class WindowedDenoiser:
    """``denoiser(x, sigma, **kwargs)`` over overlapping frame windows of ``(B, F, C, h, w)``.

    Per-frame keyword tensors (shaped ``(B, F, ...)`` like ``x``, also inside dicts such as
    Gen1Guidance's ``cond``) are sliced with ``x``; per-clip ones (content ``(B, 1, D)``) pass
    whole. The blended x0 is ``sum_k w_k D_k / sum_k w_k`` per frame (``taper_weights``).
    ``windows_seen`` counts inner calls, for progress reports and tests.
    """

    def __init__(
        self, denoiser: Denoiser, length: int, overlap: int, progress: bool = False
    ) -> None:
        window_slices(length, length, overlap)  # validates length and overlap
        self.denoiser = denoiser
        self.length = length
        self.overlap = overlap
        self.progress = progress
        self.windows_seen = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        num_frames = x.shape[1]
        windows = window_slices(num_frames, self.length, self.overlap)
        if len(windows) == 1:
            self.windows_seen += 1
            return self.denoiser(x, sigma, **kwargs)
        total = torch.zeros_like(x, dtype=torch.float32)
        weight_sum = torch.zeros(num_frames, device=x.device)
        bar = tqdm(windows, desc="windows", leave=False, disable=not self.progress)
        for frames in bar:
            part = sigma[:, frames] if torch.as_tensor(sigma).ndim == 2 else sigma  # per frame
            pred = self.denoiser(x[:, frames], part, **slice_frames(kwargs, frames, x.shape))
            weights = taper_weights(
                self.length, self.overlap, frames.start > 0, frames.stop < num_frames, x.device
            )
            total[:, frames] += pred.float() * weights.view(1, -1, *([1] * (x.ndim - 2)))
            weight_sum[frames] += weights
            self.windows_seen += 1
        return (total / weight_sum.view(1, -1, *([1] * (x.ndim - 2)))).to(x.dtype)
