"""AutoencoderKL, the Stable Diffusion VAE, in the original module layout.

Takes SD's ``ddconfig`` keyword arguments (plus ``norm_groups``, 32 as in SD, for narrow
tiny models where 32 groups would normalise each channel alone) and ``embed_dim``;
parameter names are those of ``ldm.modules.diffusionmodules.model`` so SD VAE checkpoints
load by key. The latent
scale factor (0.18215 for SD) is applied here and nowhere else: ``encode`` returns scaled
latents and ``decode`` takes them. Videos ``(B, F, 3, H, W)`` run in chunks of frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class VAEResBlock(nn.Module):
    """Norm, SiLU, 3x3 conv, twice, with a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right and bottom by one (SD's layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = VAEResBlock(channels, channels, dropout, groups)
    mid.attn_1 = VAEAttention(channels, groups)
    mid.block_2 = VAEResBlock(channels, channels, dropout, groups)
    return mid


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


class Encoder(nn.Module):
    """Pixels ``(N, in_channels, H, W)`` to latent moments ``(N, 2*z_channels, H/f, W/f)``."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        **_: object,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(VAEResBlock(channels, ch * mult, dropout, norm_groups))
                channels = ch * mult
                if res in attn_resolutions:
                    attns.append(VAEAttention(channels, norm_groups))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels)
                res //= 2
            self.down.append(level)
        self.mid = _mid(channels, dropout, norm_groups)
        self.norm_out = _norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(
            channels, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``(N, z_channels, h, w)`` to pixels ``(N, out_ch, h*f, w*f)``."""

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        **_: object,
    ) -> None:
        super().__init__()
        channels = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _mid(channels, dropout, norm_groups)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(VAEResBlock(channels, ch * ch_mult[i], dropout, norm_groups))
                channels = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(VAEAttention(channels, norm_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(channels)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SD's KL-regularised autoencoder with chunked, scaled encode/decode of videos."""

    def __init__(
        self,
        ddconfig: dict,
        embed_dim: int,
        scale_factor: float = 0.18215,
        chunk_size: int = 8,
    ) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.scale_factor = scale_factor
        self.chunk_size = chunk_size
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and log-variance of images ``(N, 3, H, W)`` in [-1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of unscaled latents ``(N, embed_dim, h, w)``."""
        return self.decoder(self.post_quant_conv(z))

    def encode(
        self,
        x: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scaled latents of images ``(N, 3, H, W)`` or videos ``(B, F, 3, H, W)``.

        ``sample=False`` returns the posterior mean, else a draw from it.
        """

        def encode_images(images: torch.Tensor) -> torch.Tensor:
            mean, logvar = self.moments(images)
            return self.scaled_latents(mean, logvar if sample else None, generator)

        return self._chunked(encode_images, x)

    def scaled_latents(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled latents from posterior moments: the mean, or a draw when ``logvar`` is given
        (for moments computed earlier, as a cache of encoded clips stores them), with the
        standard normal ``noise`` given or drawn from ``generator``."""
        if logvar is not None:
            if noise is None:
                where = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=where, dtype=mean.dtype)
            # a CPU generator draws the same on any device
            mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return mean * self.scale_factor

    def video_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior moments of images or videos (as ``encode`` takes), chunked."""
        both = self._chunked(lambda images: torch.cat(self.moments(images), dim=-3), x)
        return both.chunk(2, dim=-3)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in about [-1, 1] of scaled latents (images or videos, as ``encode`` gives)."""
        return self._chunked(lambda lat: self.decode_unscaled(lat / self.scale_factor), z)

    def _chunked(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Apply an image function to images or to the frames of videos, a chunk at a time."""
        video = x.ndim == 5
        flat = x.flatten(0, 1) if video else x
        out = torch.cat([fn(part) for part in flat.split(self.chunk_size)], dim=0)
        return out.unflatten(0, x.shape[:2]) if video else out
