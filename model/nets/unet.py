"""The Stable Diffusion UNet in its original (LDM) module layout, extendable to video.

The constructor takes the keyword arguments of ``unet_config.params`` in SD's own
inference configs, so SD 1.x, SD 2.x and SD 2-depth are configs, not code, and their
checkpoints load by key. ``temporal=True`` nests Gen-1's temporal layers inside the
blocks they follow; no SD key moves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.nets.blocks import (
    Downsample,
    InputConv,
    ResBlock,
    SiLU,
    SpatialTransformer,
    TimestepEmbedSequential,
    Upsample,
    normalization,
)
from model.nets.frames import Frames
from model.nets.temporal import zero_

# Keys of SD's configs that change nothing here (precision, image size, legacy defaults).
_IGNORED_SD_PARAMS = {"image_size", "use_fp16", "use_bf16", "legacy", "use_spatial_transformer"}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal timestep features ``[cos, sin]`` of shape ``(N, dim)``, as in LDM."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class UNet(nn.Module):
    """SD's ``UNetModel`` with optional temporal layers, structure input and content projection.

    ``forward`` takes images ``(B, C, H, W)`` or videos ``(B, F, C, H, W)``; the video's
    frames share timestep and context. Temporal layers run only for videos with ``F > 1``
    and ``temporal`` true (a bool, or a per-clip bool tensor of shape ``(B,)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = None,
        use_linear_in_transformer: bool = False,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        num_classes: int | str | None = None,
        adm_in_channels: int | None = None,
        use_checkpoint: bool = False,
        temporal: bool = False,
        temporal_max_frames: int = 32,
        content_dim: int | None = None,
        decoder: bool = True,
        **sd_params: object,
    ) -> None:
        super().__init__()
        unknown = set(sd_params) - _IGNORED_SD_PARAMS
        if unknown:
            raise TypeError(f"UNet got unsupported SD config parameters: {sorted(unknown)}")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_checkpoint = use_checkpoint
        self.temporal = temporal
        self.num_classes = num_classes

        def attention(channels: int, level: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else channels // num_head_channels
            return SpatialTransformer(
                channels,
                heads,
                channels // heads,
                depth=transformer_depth[level],
                context_dim=context_dim,
                dropout=dropout,
                use_linear=use_linear_in_transformer,
                temporal=temporal,
                temporal_max_frames=temporal_max_frames,
            )

        def resblock(channels: int, out: int) -> ResBlock:
            return ResBlock(
                channels, time_dim, out, dropout, use_scale_shift_norm, temporal=temporal
            )

        time_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels")
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
                )
            )
        elif isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_dim)
        if content_dim is not None and context_dim is not None and content_dim != context_dim:
            self.context_proj = nn.Linear(content_dim, context_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(InputConv(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), attention(ch, len(channel_mult) - 1), resblock(ch, ch)
        )
        self.encoder_channels = list(skip_channels)  # what each input block outputs
        if not decoder:  # the encoder half alone (a ControlNet: ``model.nets.controlnet``)
            return

        self.output_blocks = nn.ModuleList()
        self.upsamples: list[bool] = []  # per output block: does it end in an Upsample
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, level))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.upsamples.append(bool(level and i == num_res_blocks))

        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )

    def temporal_parameters(self) -> list[nn.Parameter]:
        """Parameters of the temporal layers (for temporal-only fine-tuning)."""
        return [p for name, p in self.named_parameters() if ".temporal." in name]

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        temporal: bool | torch.Tensor = True,
        anchors: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the model's output (eps or v) for images or videos.

        ``timesteps`` is ``(B,)``, for videos also per frame ``(B, F)`` (frames at staggered
        noise levels: ``model.editing.diagonal``); ``context`` is ``(B, tokens, D)``, for
        videos also per frame ``(B, F, tokens, D)``;
        ``y`` the class or ``label_emb`` input ``(B, ...)``.
        ``anchors`` (videos ``(B, F, ...)`` only), a long tensor ``(F, A)``, makes every spatial
        self-attention cross-frame: frame k attends to the tokens of frames ``anchors[k]``
        (``model.nets.frames.Frames``); it works with the temporal layers on or off.
        ``control``: ControlNet residuals (``model.nets.controlnet``), one per input block and
        one for the middle block, each shaped as that block's output with the frames folded
        into the batch (``(B F, C, h, w)``); they are added to the skip connections and to the
        middle block's output, as ControlNet's ``ControlledUnetModel`` adds them.
        """
        video = x.ndim == 5
        batch, num_frames = x.shape[0], (x.shape[1] if video else 1)
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"UNet expects {self.in_channels} input channels, got {x.shape[-3]} "
                f"(input shape {tuple(x.shape)})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        per_frame = video and timesteps.ndim == 2  # (B, F): every frame its own noise level
        timesteps = timesteps.expand(batch, num_frames) if per_frame else timesteps.expand(batch)
        if context is not None and hasattr(self, "context_proj"):
            context = self.context_proj(context)
        frames = self._frames(num_frames, batch, temporal, x.device) if video else None
        if anchors is not None:
            if not video:
                raise ValueError("cross-frame anchors need a video input (B, F, C, H, W)")
            if tuple(anchors.shape[:1]) != (num_frames,) or anchors.ndim != 2:
                raise ValueError(f"anchors must be ({num_frames}, A), got {tuple(anchors.shape)}")
            layout = frames if frames is not None else Frames(num_frames, temporal=False)
            frames = dataclasses.replace(layout, anchors=anchors.long())
        if video:
            x = x.flatten(0, 1)
            if per_frame:
                timesteps = timesteps.flatten()
            else:
                timesteps = repeat(timesteps, "b -> (b f)", f=num_frames)
            if context is not None and context.ndim == 4:  # per frame (B, F, n, d): keyframes
                context = context.flatten(0, 1)
            elif context is not None:
                context = repeat(context, "b n d -> (b f) n d", f=num_frames)
            if y is not None:
                y = y.repeat_interleave(num_frames, dim=0)

        emb = self.time_embed(timestep_embedding(timesteps, self.time_embed[0].in_features))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this UNet is class/ADM-conditioned: pass y")
            emb = emb + self.label_emb(y)
        emb = emb.to(x.dtype)

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, frames)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, frames)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control needs {len(skips) + 1} residuals, got {len(control)}")
            skips = [s + c.to(s.dtype) for s, c in zip(skips, control[:-1], strict=True)]
            h = h + control[-1].to(h.dtype)
        for block, upsamples in zip(self.output_blocks, self.upsamples, strict=True):
            h = torch.cat([h, skips.pop()], dim=1)
            size = None
            if upsamples and tuple(skips[-1].shape[-2:]) != (2 * h.shape[-2], 2 * h.shape[-1]):
                size = tuple(skips[-1].shape[-2:])  # an odd size was halved on the way down
            h = self._run(block, h, emb, context, frames, size)
        out = self.out(h)
        return out.unflatten(0, (batch, num_frames)) if video else out

    def _run(self, block, h, emb, context, frames, output_size=None):
        """Run one block, through activation checkpointing when training with it on."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, frames, output_size, use_reentrant=False)
        return block(h, emb, context, frames, output_size)

    def _frames(self, num_frames, batch, temporal, device) -> Frames | None:
        """The temporal-layer schedule of a video batch; None runs the image model."""
        if not self.temporal or num_frames == 1:
            return None
        if isinstance(temporal, bool):
            return Frames(num_frames) if temporal else None
        on = torch.as_tensor(temporal, device=device).bool().reshape(batch)
        if not bool(on.any()):
            return None
        if bool(on.all()):
            return Frames(num_frames)
        gate = repeat(on, "b -> (b f) 1 1 1", f=num_frames)
        return Frames(num_frames, gate)
