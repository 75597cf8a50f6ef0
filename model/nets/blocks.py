"""The UNet's building blocks in SD's original layout: ResBlock, SpatialTransformer, resampling.

Every block has the same call signature, ``block(x, emb, context, frames)``, so a UNet
level is a plain ``nn.Sequential`` whose members are called alike (no type dispatch).
``frames`` is None for the image model; otherwise the block's temporal child (a
``temporal`` attribute, absent in image-only models) mixes information across frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.nets.attention import BasicTransformerBlock
from model.nets.frames import Frames
from model.nets.temporal import TemporalAttention, TemporalConv, zero_


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as SD does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class SiLU(nn.SiLU):
    """SiLU, computed in place when no gradient is being recorded (inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x, inplace=not torch.is_grad_enabled())


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """SD's normalisation layer: 32 groups."""
    return GroupNorm32(32, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added between them, plus a skip.

    With ``temporal=True`` a temporal convolution follows (``temporal`` child).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        temporal: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            SiLU(),
            nn.Dropout(dropout),
            zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        if temporal:
            self.temporal = TemporalConv(out_channels)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        frames: Frames | None = None,
    ) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h.add_(emb_out) if not torch.is_grad_enabled() else h + emb_out)
        h = self.skip_connection(x) + h
        if frames is not None and frames.temporal and hasattr(self, "temporal"):
            h = self.temporal(h, frames)
        return h


class SpatialTransformer(nn.Module):
    """Attention over the pixels of each frame, with cross-attention to the context.

    ``use_linear`` picks SD 2's linear ``proj_in``/``proj_out`` over SD 1's 1x1 convs.
    With ``temporal=True`` a temporal attention block follows (``temporal`` child).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        temporal: bool = False,
        temporal_max_frames: int = 32,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        project = nn.Linear if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = project(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout)
            for _ in range(depth)
        )
        self.proj_out = zero_(project(inner, channels))
        if temporal:
            self.temporal = TemporalAttention(channels, heads, dim_head, temporal_max_frames)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        frames: Frames | None = None,
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x.float()).to(x.dtype)
        if not self.use_linear:
            h = self.proj_in(h)
        # (b, c, h, w) -> (b, h*w, c); free when x is channels-last.
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, frames)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            h = self.proj_out(h)
        h = h + x
        if frames is not None and frames.temporal and hasattr(self, "temporal"):
            h = self.temporal(h, frames)
        return h


class InputConv(nn.Conv2d):
    """The UNet's first 3x3 convolution, callable like the other blocks."""

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        return super().forward(x)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution (SD's ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution; to ``output_size`` (the
    skip connection's size) instead where an odd size was halved on the way down, as
    diffusers' ``forward_upsample_size`` does, so the UNet takes any latent size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        frames: Frames | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if output_size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(output_size), mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks all called as ``block(x, emb, context, frames)``."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        frames: Frames | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``output_size``, when given, goes to the last layer (an ``Upsample``)."""
        last = len(self) - 1
        for i, layer in enumerate(self):
            if i == last and output_size is not None:
                return layer(x, emb, context, frames, output_size)
            x = layer(x, emb, context, frames)
        return x
