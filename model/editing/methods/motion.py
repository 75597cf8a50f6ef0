"""Global motion of a video by phase correlation, and integer translations of latents.

Text2Video-Zero (Khachatryan et al. 2023) moves the first frame's noise along the video's
motion; the previous-frame start moves the previous output the same way. The motion is one
translation per frame pair, estimated from the input frames by phase correlation (Kuglin &
Hines 1975: the peak of the inverse FFT of the normalised cross-power spectrum), with a Hann
window against the frame border and a parabolic fit of the peak for sub-pixel shifts.
"""

from __future__ import annotations

import torch


def _parabolic(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Offset in (-0.5, 0.5) of a parabola's vertex through three samples around a peak."""
    denom = left - 2 * centre + right
    offset = torch.where(denom.abs() > 1e-12, 0.5 * (left - right) / denom, torch.zeros_like(denom))
    return offset.clamp(-0.5, 0.5)


def phase_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Translation ``(dy, dx)`` in pixels (float) that moves image ``a`` onto ``b``:
    ``b[y, x] ~ a[y - dy, x - dx]``. ``a``, ``b``: ``(N, H, W)`` grey images (any range);
    returns ``(N, 2)``. Shifts are found in ``(-H/2, H/2]`` x ``(-W/2, W/2]``."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) images, got {tuple(a.shape)}, {tuple(b.shape)}")
    n, h, w = a.shape
    window = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    fa = torch.fft.fft2((a - a.mean((1, 2), keepdim=True)).double() * window.double())
    fb = torch.fft.fft2((b - b.mean((1, 2), keepdim=True)).double() * window.double())
    cross = fb * fa.conj()
    surface = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-12)).real  # (N, H, W)
    peak = surface.flatten(1).argmax(1)
    py, px = peak // w, peak % w
    rows = torch.arange(n)
    dy = _parabolic(surface[rows, (py - 1) % h, px], surface[rows, py, px],
                    surface[rows, (py + 1) % h, px])  # fmt: skip
    dx = _parabolic(surface[rows, py, (px - 1) % w], surface[rows, py, px],
                    surface[rows, py, (px + 1) % w])  # fmt: skip
    shift = torch.stack([py.double() + dy, px.double() + dx], dim=1)
    size = torch.tensor([h, w], dtype=torch.float64)
    shift = torch.where(shift > size / 2, shift - size, shift)  # wrap to signed shifts
    return shift.float()


def video_motion(frames: torch.Tensor) -> torch.Tensor:
    """Cumulative global translation of every frame from the first, ``(B, F, 2)`` pixels
    ``(dy, dx)`` (frame 0: zeros), summed over consecutive frame pairs' phase correlation of
    ``frames`` ``(B, F, 3, H, W)`` (any range; their luma is used)."""
    if frames.ndim != 5:
        raise ValueError(f"expected frames (B, F, 3, H, W), got {tuple(frames.shape)}")
    weights = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 1, 3, 1, 1)
    luma = (frames.float().cpu() * weights.float().cpu()).sum(2)  # (B, F, H, W)
    b, f = luma.shape[:2]
    steps = torch.zeros(b, f, 2)
    if f > 1:
        pairs = phase_correlation(luma[:, :-1].flatten(0, 1), luma[:, 1:].flatten(0, 1))
        steps[:, 1:] = pairs.view(b, f - 1, 2)
    return steps.cumsum(1)


def shift_latents(
    latents: torch.Tensor, shift: tuple[int, int], fill: torch.Tensor | None = None
) -> torch.Tensor:
    """``latents`` ``(..., h, w)`` moved by the integer ``shift`` ``(dy, dx)``:
    ``out[..., y, x] = latents[..., y - dy, x - dx]``; uncovered positions take ``fill``
    (same shape; None: zeros). A translation, never a resampling, so Gaussian noise stays
    exactly Gaussian."""
    dy, dx = (int(s) for s in shift)
    h, w = latents.shape[-2:]
    out = torch.zeros_like(latents) if fill is None else fill.clone()
    if abs(dy) >= h or abs(dx) >= w:
        return out
    dst_y, src_y = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    dst_x, src_x = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., dst_y, dst_x] = latents[..., src_y, src_x]
    return out


def latent_shift(pixels: torch.Tensor, factor: int) -> tuple[int, int]:
    """A pixel translation ``(2,)`` as the nearest whole latent translation at the VAE's
    ``factor``."""
    dy, dx = (round(float(p) / factor) for p in pixels)
    return dy, dx
