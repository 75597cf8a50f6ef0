"""Video-edit metrics: CLIP frame and prompt consistency (as Gen-1 reports them), structure
fidelity (scale- and shift-invariant depth error), flow warp error and sharpness.

Pure functions on tensors; frames are ``(F, 3, H, W)`` in [-1, 1]. ``eval.py`` runs them on
edits of the procedural world, whose exact flow and surface ids make the warp error exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.encoders.structure import align_scale_shift, standardise


def _check_frames(frames: torch.Tensor, min_frames: int = 1) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames (F, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"need at least {min_frames} frames, got {frames.shape[0]}")


def _on_device_of(module: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    return frames.to(next(module.parameters()).device)


def frame_consistency(clip, frames: torch.Tensor) -> float:
    """Mean cosine similarity of the CLIP image embeddings of consecutive frames (Gen-1's
    temporal-consistency score; 1 for a still video). ``clip``: a ``ClipEmbedder``."""
    _check_frames(frames, min_frames=2)
    emb = F.normalize(clip.encode_image(_on_device_of(clip, frames)).float(), dim=-1)
    return float((emb[1:] * emb[:-1]).sum(-1).mean())


def prompt_consistency(clip, frames: torch.Tensor, prompt: str) -> float:
    """Mean cosine similarity of the CLIP text embedding of ``prompt`` and each frame's image
    embedding (Gen-1's prompt-consistency score)."""
    _check_frames(frames)
    images = F.normalize(clip.encode_image(_on_device_of(clip, frames)).float(), dim=-1)
    text = F.normalize(clip.encode_text(prompt).float(), dim=-1).to(images.device)
    return float((images @ text[0]).mean())


def _depth_frames(depth: torch.Tensor, name: str) -> torch.Tensor:
    """``(F, 1, H, W)`` or ``(F, H, W)`` -> float ``(F, H, W)``."""
    if depth.ndim == 4 and depth.shape[1] == 1:
        depth = depth[:, 0]
    if depth.ndim != 3:
        raise ValueError(f"{name} must be (F, 1, H, W) or (F, H, W), got {tuple(depth.shape)}")
    return depth.float()


def structure_fidelity(depth_in: torch.Tensor, depth_out: torch.Tensor) -> float:
    """Scale- and shift-invariant depth error of an edit (lower is better; 0 = same structure).

    Per frame, the input's (inverse) depth is standardised (zero mean, unit std) and the
    output's depth is fitted to it by least squares in scale and shift, as MiDaS aligns its
    predictions; the error is the mean *squared* difference after the fit, averaged over
    frames. Because the target has unit variance the number is about ``1 - r^2`` (r: the
    per-frame correlation of the two depths): comparable across clips, 1 when the output's
    depth has no linear relation to the input's. ``depth_out`` is resized to the input's
    size (bilinear, antialiased) if they differ.
    """
    din, dout = _depth_frames(depth_in, "depth_in"), _depth_frames(depth_out, "depth_out")
    if din.shape[0] != dout.shape[0]:
        raise ValueError(f"depth_in has {din.shape[0]} frames, depth_out {dout.shape[0]}")
    if din.shape[-2:] != dout.shape[-2:]:
        size = din.shape[-2:]
        dout = F.interpolate(dout[:, None], size=size, mode="bilinear", antialias=True)[:, 0]
    target = standardise(din)
    fitted = align_scale_shift(dout.to(target.device), target)
    return float((fitted - target).square().flatten(1).mean(1).mean())


def target_coordinates(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-index coordinates ``(x, y)`` (each ``(N, H, W)``) where each pixel lands."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=flow.dtype, device=flow.device),
        torch.arange(w, dtype=flow.dtype, device=flow.device),
        indexing="ij",
    )
    return xs + flow[:, 0], ys + flow[:, 1]


def flow_valid_mask(flow: torch.Tensor, surface: torch.Tensor | None = None) -> torch.Tensor:
    """Where forward ``flow`` ``(F-1, 2, H, W)`` is usable for a warp error: ``(F-1, H, W)`` bool.

    A pixel is valid when it lands inside frame k+1 (its bilinear footprint fully in the
    image) and, given the world's ``surface`` ids ``(F, H, W)`` (-1 sky, 0 floor, k body), when
    all four pixels its bilinear sample reads in frame k+1 show the surface it comes from, so
    occlusions and surface edges (where bilinear sampling mixes surfaces) are left out.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be (F-1, 2, H, W) (dx, dy), got {tuple(flow.shape)}")
    n, _, h, w = flow.shape
    x, y = target_coordinates(flow.float())
    valid = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    if surface is None:
        return valid
    if surface.shape != (n + 1, h, w):
        raise ValueError(f"surface must be (F, H, W) = {(n + 1, h, w)}, got {tuple(surface.shape)}")
    surface = surface.to(flow.device)
    later = surface[1:].flatten(1)
    for row in (y.floor(), y.ceil()):
        for col in (x.floor(), x.ceil()):
            index = row.long().clamp(0, h - 1) * w + col.long().clamp(0, w - 1)
            seen = torch.gather(later, 1, index.flatten(1)).view(n, h, w)
            valid &= seen == surface[:-1]
    return valid


def warp_error(
    frames: torch.Tensor, flow: torch.Tensor, valid: torch.Tensor | None = None
) -> float:
    """Flow warp error: mean *squared* colour difference (pixel values in [-1, 1], averaged over
    channels) between frame k and frame k+1 sampled where frame k's pixels move to (bilinear),
    over the pixels of ``valid`` ``(F-1, H, W)`` (default: those landing inside the frame; see
    ``flow_valid_mask``). ``flow`` ``(F-1, 2, H, W)``: forward flow in pixels, (dx, dy). A
    video moving exactly with the flow scores ~0; flicker and drift raise it.
    """
    _check_frames(frames, min_frames=2)
    n = frames.shape[0] - 1
    if flow.shape != (n, 2, *frames.shape[-2:]):
        raise ValueError(
            f"flow must be (F-1, 2, H, W) = {(n, 2, *frames.shape[-2:])}, got {tuple(flow.shape)}"
        )
    h, w = frames.shape[-2:]
    frames, flow = frames.float(), flow.float().to(frames.device)
    x, y = target_coordinates(flow)
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)  # pixel centres
    warped = F.grid_sample(
        frames[1:], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    error = (warped - frames[:-1]).square().mean(1)
    valid = flow_valid_mask(flow) if valid is None else valid.to(error.device).bool()
    if valid.shape != error.shape:
        raise ValueError(f"valid must be (F-1, H, W) = {tuple(error.shape)}, got {valid.shape}")
    if not bool(valid.any()):
        raise ValueError("no valid pixel: the flow leaves the frame everywhere")
    return float(error[valid].mean())


def sharpness(frames: torch.Tensor) -> float:
    """Mean squared Laplacian of the frames' luma (pixel values in [-1, 1]): detail and edge
    energy, which falls as an edit blurs (e.g. with a coarser structure ``t_s``)."""
    _check_frames(frames)
    x = frames.float()
    luma = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    kernel = luma.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    laplacian = F.conv2d(luma[:, None], kernel.view(1, 1, 3, 3))
    return float(laplacian.square().mean())
