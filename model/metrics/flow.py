"""Optical flow of real clips, for warp errors where no exact flow exists.

The procedural world gives its exact flow; a real clip's is estimated here with OpenCV's
Farneback method (Farneback 2003, "Two-Frame Motion Estimation Based on Polynomial
Expansion") on the input's luma, forward and backward, and a pixel is used only where the
two agree (the forward-backward check of Sundaram et al. 2010, "Dense Point Trajectories by
GPU-accelerated Large Displacement Optical Flow", as video-consistency metrics mask
occlusions, e.g. Lai et al. 2018) and it lands inside the next frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model.metrics.video import flow_valid_mask, target_coordinates

# Farneback's parameters: a 3-level pyramid at scale 0.5, window 15, 3 iterations, a
# polynomial of 5 pixels with sigma 1.2 (OpenCV's sample values).
FARNEBACK = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}


def _luma(frames: torch.Tensor) -> list[np.ndarray]:
    """``(F, 3, H, W)`` in [-1, 1] -> uint8 luma images."""
    weights = frames.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    luma = ((frames.float() * weights).sum(1) + 1) * 127.5
    return [image.round().clamp(0, 255).byte().numpy() for image in luma.cpu()]


def _farneback(first: np.ndarray, second: np.ndarray) -> torch.Tensor:
    flow = cv2.calcOpticalFlowFarneback(first, second, None, **FARNEBACK)
    return torch.from_numpy(flow).permute(2, 0, 1)  # (2, H, W): dx, dy


def estimated_flow(
    frames: torch.Tensor, tolerance: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward flow ``(F-1, 2, H, W)`` (dx, dy in pixels: frame k's pixel lands at ``p +
    flow`` in frame k+1, the convention of ``model.metrics.video``) of frames ``(F, 3, H,
    W)`` in [-1, 1], and where it is valid ``(F-1, H, W)`` (bool): inside frame k+1 and
    forward-backward consistent, ``|f(p) + b(p + f(p))|^2 < 0.01 (|f|^2 + |b|^2) +
    tolerance`` pixels squared. ``ValueError`` for fewer than two frames."""
    if frames.ndim != 4 or frames.shape[0] < 2 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (F >= 2, 3, H, W), got {tuple(frames.shape)}")
    luma = _luma(frames)
    forward = torch.stack([_farneback(a, b) for a, b in zip(luma, luma[1:], strict=False)])
    backward = torch.stack([_farneback(b, a) for a, b in zip(luma, luma[1:], strict=False)])
    h, w = frames.shape[-2:]
    x, y = target_coordinates(forward)
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)
    back = F.grid_sample(
        backward, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    mismatch = (forward + back).square().sum(1)
    scale = forward.square().sum(1) + back.square().sum(1)
    consistent = mismatch < 0.01 * scale + tolerance
    return forward, flow_valid_mask(forward) & consistent
