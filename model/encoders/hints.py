"""ControlNet hints ("control images") made from a video's frames, as ControlNet's annotators
make them, so that a public ControlNet sees the input it was trained on.

Every hint is ``(N, 3, H, W)`` float in [0, 1] at the frames' pixel size:

- ``depth``: MiDaS inverse depth normalised per image to [0, 1] (near = bright), repeated to
  3 channels (``annotator/midas``: ``depth -= min; depth /= max``);
- ``canny``: OpenCV's Canny edges of the 8-bit RGB frame (``annotator/canny``,
  ``cv2.Canny(img, low, high)``), white edges on black, 3 channels;
- ``softedge`` (HED): ``model.encoders.hed`` (``ControlNetHED.pth``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

CANNY_THRESHOLDS = (100, 200)  # the ControlNet demos' and A1111's defaults


def depth_hint(depth: torch.Tensor) -> torch.Tensor:
    """The depth ControlNets' control image ``(N, 3, H, W)`` in [0, 1] from MiDaS inverse
    depth ``(N, 1, H, W)`` (any scale; larger = nearer): per image min-max to [0, 1]."""
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    high = depth.amax(dim=(1, 2, 3), keepdim=True)
    normalised = (depth - low) / (high - low).clamp_min(1e-8)
    return normalised.float().expand(-1, 3, -1, -1).contiguous()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames ``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8 RGB (rounded)."""
    pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def canny_hint(
    frames: torch.Tensor, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]
) -> torch.Tensor:
    """Canny edges ``(N, 3, H, W)`` in {0, 1} of frames ``(N, 3, H, W)`` in [-1, 1] (OpenCV on
    the 8-bit RGB image, thresholds ``low`` < ``high`` on the gradient, 0..255 units).
    Raises ``ValueError`` for thresholds out of order."""
    if not 0 <= low < high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low < high, got {low}, {high}")
    edges = [cv2.Canny(np.ascontiguousarray(image), low, high) for image in to_uint8(frames)]
    hint = torch.from_numpy(np.stack(edges)).float().div(255.0)
    return hint[:, None].expand(-1, 3, -1, -1).contiguous()
