"""Gen-1 structure conditioning: clip-normalised depth at latent size, blurred ``t_s`` times.

Order of operations, per clip:
1. Resize each depth frame to the latent size. Downsampling uses area averaging: a latent
   cell of SD's f=8 VAE covers an 8x8 pixel block, and area gives it exactly that block's
   mean depth, with no ringing at occlusion edges (bicubic overshoots there) and no aliasing.
   Upsampling, which only tiny test set-ups need, is bicubic.
2. Normalise with the min and max over the whole clip (all frames together) to [-1, 1].
   Per-frame normalisation would rescale every frame on its own and make the structure
   flicker as objects enter or leave. Normalising after the resize (as SD 2 depth does per
   image) makes the tensor the UNet sees span exactly [-1, 1]. An image is a 1-frame clip.
3. Structure fidelity ``t_s``: ``t_s`` passes of a fixed 5-tap binomial (Gaussian, sigma 1
   latent pixel) blur, replicate-padded. Each pass multiplies every non-zero spatial
   frequency by cos(w/2)^4 < 1, so a higher ``t_s`` strictly removes more high-frequency
   detail; after ``t`` passes the blur is a Gaussian of sigma sqrt(t). Gen-1 says "blurred
   and downsampled t_s times"; halving the resolution each pass would leave a 64-pixel
   latent 1 pixel wide at t_s = 6 (training draws t_s up to 7), so the passes blur only and
   keep the latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 1, h, w)``: area when shrinking, bicubic when enlarging."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    shrinking = size[0] <= depth.shape[-2] and size[1] <= depth.shape[-1]
    if shrinking:
        return F.interpolate(depth, size=size, mode="area")
    return F.interpolate(depth, size=size, mode="bicubic", align_corners=False)


def normalize_clip(depth: torch.Tensor) -> torch.Tensor:
    """``(B, F, 1, H, W)`` -> [-1, 1] by each clip's min and max over (F, H, W).

    A constant clip (no depth variation) maps to 0.
    """
    flat = depth.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1, 1)
    high = flat.amax(dim=1).view(-1, 1, 1, 1, 1)
    span = high - low
    scaled = 2 * (depth - low) / span.clamp_min(torch.finfo(depth.dtype).tiny) - 1
    return torch.where(span > 0, scaled, torch.zeros_like(depth))


def blur_once(x: torch.Tensor) -> torch.Tensor:
    """One structure-fidelity pass on ``(N, 1, h, w)``: separable 5-tap binomial blur."""
    kernel = _BINOMIAL_5.to(device=x.device, dtype=x.dtype)
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, 5))
    return F.conv2d(x, kernel.view(1, 1, 5, 1))


def blur_structure(structure: torch.Tensor, t_s: int | torch.Tensor) -> torch.Tensor:
    """Blurs each clip of ``(B, F, 1, h, w)`` ``t_s`` times; ``t_s`` an int or per-clip ``(B,)``."""
    b = structure.shape[0]
    t_s = torch.as_tensor(t_s, device=structure.device).long().expand(b)
    if (t_s < 0).any():
        raise ValueError(f"structure fidelity t_s must be >= 0, got {t_s.tolist()}")
    passes = int(t_s.max()) if b else 0
    out, x = structure, structure.flatten(0, 1)
    for done in range(1, passes + 1):
        x = blur_once(x)
        pick = (t_s == done).view(b, 1, 1, 1, 1)
        out = torch.where(pick, x.view_as(structure), out)
    return out


def clip_structure(
    depth: torch.Tensor, latent_size: tuple[int, int], t_s: int | torch.Tensor = 0
) -> torch.Tensor:
    """Structure of clips: depth ``(B, F, 1, H, W)`` -> ``(B, F, 1, h, w)`` in [-1, 1].

    Resized to ``latent_size``, normalised over each whole clip, blurred ``t_s`` times
    (see the module docstring). ``t_s`` is an int for the batch or a ``(B,)`` tensor.
    """
    if depth.ndim != 5 or depth.shape[2] != 1:
        raise ValueError(f"expected depth (B, F, 1, H, W), got {tuple(depth.shape)}")
    b, f = depth.shape[:2]
    small = resize_depth(depth.flatten(0, 1).float(), tuple(latent_size))
    structure = normalize_clip(small.view(b, f, 1, *small.shape[-2:]))
    return blur_structure(structure, t_s)


def align_scale_shift(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``s * prediction + t`` per image ``(N, H, W)``, with the least-squares fit of ``s, t``
    to ``target`` (MiDaS's alignment); a constant prediction gets ``s = 0, t = mean``."""
    p, y = prediction.flatten(1), target.flatten(1)
    p_mean, y_mean = p.mean(1, keepdim=True), y.mean(1, keepdim=True)
    p_c = p - p_mean  # centred: no cancellation between large sums
    variance = p_c.square().mean(1)
    fit = variance > 1e-10 * p.square().mean(1) + 1e-20
    scale = torch.where(fit, (p_c * (y - y_mean)).mean(1) / variance.clamp_min(1e-20), 0.0)
    shift = y_mean[:, 0] - scale * p_mean[:, 0]
    return prediction * scale[:, None, None] + shift[:, None, None]


def standardise(depth: torch.Tensor) -> torch.Tensor:
    """Each image ``(N, H, W)`` shifted and scaled to zero mean and unit std."""
    flat = depth.flatten(1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    return (depth - mean[:, None, None]) / std[:, None, None]


def edit_structure(
    depth: torch.Tensor,
    latent_size: tuple[int, int],
    t_s: int | torch.Tensor = 0,
    frames_independent: bool = False,
) -> torch.Tensor:
    """An edit's structure ``(B, F, 1, h, w)`` of depth ``(B, F, 1, H, W)`` (``clip_structure``):
    normalised over each clip, or over each frame alone when ``frames_independent`` (as the
    image model saw single frames in training). ``t_s``: blur passes, an int, a ``(B,)``
    tensor, or per frame a ``(1, F)`` tensor (a keyframe schedule: each frame blurred its own
    number of times)."""
    if isinstance(t_s, torch.Tensor) and t_s.ndim == 2:
        passes = t_s.flatten().long().cpu()
        parts = {
            int(v): edit_structure(depth, latent_size, int(v), frames_independent)
            for v in passes.unique()
        }
        return torch.stack([parts[int(v)][:, k] for k, v in enumerate(passes)], dim=1)
    if frames_independent:
        b, f = depth.shape[:2]
        alone = depth.reshape(b * f, 1, *depth.shape[2:])  # every frame a one-frame clip
        structure = clip_structure(alone, tuple(latent_size), t_s)
        return structure.reshape(b, f, *structure.shape[2:])
    return clip_structure(depth, tuple(latent_size), t_s)
