"""ControlNet (Zhang, Rao & Agrawala 2023) in its original module layout.

A trainable copy of an SD UNet's encoder half (``time_embed``, ``input_blocks``,
``middle_block``) reads the latents, the timestep and the text like the UNet, plus a control
image (a "hint": depth, edges, pose... at pixel resolution) embedded by ``input_hint_block``
(convolutions down to the latent size, the last one zero-initialised) and added after the first
block. Every block's output goes through a zero-initialised 1x1 convolution (``zero_convs``,
``middle_block_out``) to give the residuals the UNet adds to its skip connections and middle
block (``UNet.forward(control=...)``). Module names are those of ``cldm/cldm.py``'s
``ControlNet``, so ``control_model.*`` files load by key; diffusers' ``ControlNetModel`` is
the same network under other names (``model.sd.controlnet`` renames them).
"""

from __future__ import annotations

import torch
from torch import nn

from model.nets.temporal import zero_
from model.nets.unet import UNet, timestep_embedding

# cldm's hint embedding widths (diffusers' ``conditioning_embedding_out_channels``); each
# width after the first starts with a stride-2 convolution, so three halvings: f = 8.
HINT_CHANNELS = (16, 32, 96, 256)


def hint_block(hint_channels: int, widths: tuple[int, ...], model_channels: int) -> nn.Module:
    """cldm's ``input_hint_block``: conv+SiLU pairs (stride 2 where the width grows) ending in a
    zero conv to ``model_channels``; indices 0, 2, ..., 2 (2 len(widths) - 1) hold the convs."""
    layers: list[nn.Module] = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for inner, outer in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(inner, inner, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(inner, outer, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_(nn.Conv2d(widths[-1], model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class ControlNet(UNet):
    """A ControlNet for an SD UNet of the same constructor arguments (``unet_config.params``).

    ``hint_channels``: channels of the control image (3 for every public ControlNet);
    ``hint_widths``: the hint embedding's widths, whose count sets the hint's downsampling
    (``2 ** (len - 1)``, which must be the VAE's factor). Temporal layers are not allowed: the
    control copy runs frame by frame.
    """

    def __init__(
        self,
        hint_channels: int = 3,
        hint_widths: tuple[int, ...] = HINT_CHANNELS,
        **unet_params: object,
    ) -> None:
        if unet_params.get("temporal"):
            raise ValueError("a ControlNet has no temporal layers")
        unet_params.pop("out_channels", None)
        super().__init__(out_channels=0, decoder=False, **unet_params)
        self.hint_channels = hint_channels
        self.hint_factor = 2 ** (len(hint_widths) - 1)
        model_channels = self.encoder_channels[0]
        self.input_hint_block = hint_block(hint_channels, tuple(hint_widths), model_channels)
        self.zero_convs = nn.ModuleList(
            nn.Sequential(zero_(nn.Conv2d(c, c, 1))) for c in self.encoder_channels
        )
        middle = self.encoder_channels[-1]
        self.middle_block_out = nn.Sequential(zero_(nn.Conv2d(middle, middle, 1)))

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None,
        hint: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The residuals of latents ``x`` ``(N, C, h, w)`` at ``timesteps`` ``(N,)`` with text
        ``context`` ``(N, tokens, D)`` and control image ``hint`` ``(N, hint_channels, H, W)``
        in [0, 1] at ``H, W = f h, f w`` (f: ``hint_factor``): one ``(N, C_i, h_i, w_i)`` per
        input block of the UNet, then the middle block's. Unscaled (``scale`` 1).
        Raises ``ValueError`` when the hint's size is not ``f`` times the latents'."""
        if tuple(hint.shape[-2:]) != (
            x.shape[-2] * self.hint_factor,
            x.shape[-1] * self.hint_factor,
        ):
            raise ValueError(
                f"ControlNet hint {tuple(hint.shape[-2:])} must be {self.hint_factor}x the "
                f"latents' {tuple(x.shape[-2:])}"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.time_embed[0].in_features))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this ControlNet is class/ADM-conditioned: pass y")
            emb = emb + self.label_emb(y)
        emb = emb.to(x.dtype)
        guided = self.input_hint_block(hint.to(x.dtype))
        outs, h = [], x
        for i, (block, zero_conv) in enumerate(
            zip(self.input_blocks, self.zero_convs, strict=True)
        ):
            h = self._run(block, h, emb, context, None)
            if i == 0:
                h = h + guided
            outs.append(zero_conv(h))
        h = self._run(self.middle_block, h, emb, context, None)
        outs.append(self.middle_block_out(h))
        return outs
