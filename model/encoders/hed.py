"""Soft edges (HED) for ControlNet's ``softedge`` / ``hed`` models, from ``ControlNetHED.pth``.

The network is ControlNet 1.1's Apache-2.0 HED (``annotator/hed``: ``ControlNetHED_Apache2``):
five VGG-like stages of 3x3 convolutions with ReLU, max-pooled 2x between stages, each with a
1x1 projection to one edge map; the input is the RGB image in 0..255 minus a learnt ``norm``.
The soft-edge image is the sigmoid of the mean of the five maps, each resized (bilinear) to
the image size. Module names follow the file's keys (``block1.convs.0.weight``, ``norm``...),
so the public weight file loads by key.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights.checkpoint import load_strict, read_state_dict

STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class DoubleConvBlock(nn.Module):
    """``layers`` 3x3 convolutions with ReLU, and a 1x1 projection of the result to one map."""

    def __init__(self, channels_in: int, channels_out: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[nn.Conv2d(channels_in if i == 0 else channels_out, channels_out, 3, padding=1)
              for i in range(layers)]
        )  # fmt: skip
        self.projection = nn.Conv2d(channels_out, 1, 1)

    def forward(self, x: torch.Tensor, downsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(x, 2, 2) if downsample else x
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HED(nn.Module):
    """ControlNet 1.1's HED: ``(N, 3, H, W)`` RGB in 0..255 -> five edge logit maps."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(STAGES, start=1):
            self.add_module(f"block{i}", DoubleConvBlock(cin, cout, layers))

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        h, maps = rgb - self.norm, []
        for i in range(1, len(STAGES) + 1):
            h, projection = getattr(self, f"block{i}")(h, downsample=i > 1)
            maps.append(projection)
        return maps


def load_hed(path: str | Path) -> HED:
    """The HED network of ``ControlNetHED.pth`` (or a ``.safetensors`` of the same keys), eval,
    float32; ``FileNotFoundError`` / ``CheckpointError`` name the file (and the keys)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"HED weights not found: {path} (ControlNetHED.pth)")
    net = HED()
    load_strict(net, read_state_dict(path), path)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def softedge_hint(hed: HED, frames: torch.Tensor) -> torch.Tensor:
    """Soft edges ``(N, 3, H, W)`` in [0, 1] of frames ``(N, 3, H, W)`` in [-1, 1]: the 8-bit
    image through ``hed``, the sigmoid of the mean of its maps resized to ``H, W``."""
    device = next(hed.parameters()).device
    rgb = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(device)
    size = frames.shape[-2:]
    maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in hed(rgb)]
    edge = torch.sigmoid(torch.cat(maps, dim=1).double().mean(dim=1, keepdim=True)).float()
    return edge.expand(-1, 3, -1, -1).cpu().contiguous()
