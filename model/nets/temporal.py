"""Gen-1's temporal layers: a 1D convolution and a self-attention over the frame axis.

Spatial layers see frames folded into the batch, ``(b f) c h w``. Each temporal layer
unfolds the frame axis, mixes information across frames and adds its output back
residually through a zero-initialised projection, so a freshly built video UNet computes,
frame by frame, exactly what the image UNet computes (as AnimateDiff's motion modules do).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from model.nets.attention import Attention, FeedForward
from model.nets.frames import Frames


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The transformer's sine/cosine encoding of positions ``0..length-1``, ``(length, dim)``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs[: dim // 2])
    return table


class TemporalConv(nn.Module):
    """GroupNorm, SiLU and a kernel-3 convolution over frames, added residually."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)
        self.conv = zero_(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

    def forward(self, x: torch.Tensor, frames: Frames) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(x, "(b f) c h w -> b c f (h w)", f=frames.count)
        h = nn.functional.silu(self.norm(h.float()).to(h.dtype))
        # The (3, 1, 1) Conv3d as a (3, 1) Conv2d over (frames, pixels): same weights, but
        # oneDNN kernels on CPU where Conv3d falls back to a slow path (about 2x here).
        weight = self.conv.weight.squeeze(-1)
        h = nn.functional.conv2d(h, weight, self.conv.bias, padding=(1, 0))
        h = rearrange(h, "b c f (h w) -> (b f) c h w", h=height, w=width)
        return frames.add(x, h)


class TemporalAttention(nn.Module):
    """Self-attention across the frames of each spatial position, then a small MLP.

    Frame positions enter through a learned encoding (initialised sinusoidal) added to the
    normalised input; sequences are the ``b*h*w`` spatial positions, batched in one call.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, max_frames: int = 32, ff_mult: int = 2
    ) -> None:
        super().__init__()
        self.max_frames = max_frames
        self.norm = nn.LayerNorm(channels)
        self.pos_embed = nn.Parameter(sinusoidal_positions(max_frames, channels))
        self.attn = Attention(channels, None, heads, dim_head)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = FeedForward(channels, mult=ff_mult)
        zero_(self.attn.to_out)
        zero_(self.ff.net[2])

    def forward(self, x: torch.Tensor, frames: Frames) -> torch.Tensor:
        if frames.count > self.max_frames:
            raise ValueError(
                f"{frames.count} frames exceed the temporal attention's max_frames "
                f"({self.max_frames}); sample long videos in temporal windows"
            )
        height, width = x.shape[-2:]
        h = rearrange(x, "(b f) c h w -> (b h w) f c", f=frames.count)
        delta = self.attn(self.norm(h) + self.pos_embed[: frames.count].to(h.dtype))
        delta = delta + self.ff(self.norm_ff(h + delta))
        delta = rearrange(delta, "(b h w) f c -> (b f) c h w", h=height, w=width)
        return frames.add(x, delta)
