"""The model interface of the editing pipeline: what ``edit_video`` asks of a model.

Two classes implement it, structurally (neither imports this module):
``model.training.gen1.Gen1`` (the Gen-1 video model) and ``model.sd.model.StableDiffusion``
(an SD checkpoint). The pipeline calls only these members, so it holds no branch on the
model's class; what differs between models lives in the models (their conditioning) and in
the methods (``model.editing.methods``: noise and guidance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from model.diffusion.schedule import DiscreteSchedule
from model.nets.autoencoder import AutoencoderKL


class EditableModel(Protocol):
    """A model the editing pipeline runs."""

    vae: AutoencoderKL  # frames in [-1, 1] <-> scaled latents
    schedule: DiscreteSchedule  # the discrete DDPM schedule the UNet was trained on
    depth: nn.Module | None  # its MiDaS (``(B, F, 3, H, W)`` -> ``(B, F, 1, H, W)``), or None
    methods: tuple[str, ...]  # editing methods it runs, its default first

    @property
    def parameterization(self) -> str:
        """ "eps" or "v"."""
        ...

    @property
    def uses_depth(self) -> bool:
        """Whether ``edit_conditioning`` needs the frames' depth."""
        ...

    def sampling_unet(self) -> nn.Module:
        """The UNet sampling runs (a Gen-1 checkpoint's EMA copy when it has one)."""
        ...

    def model_fn(self, unet: nn.Module | None = None) -> Callable[..., torch.Tensor]:
        """``fn(x_in, t, **cond) -> model output`` for latents ``(B, F, C, h, w)``, accepting
        every key ``edit_conditioning`` returns plus ``temporal`` (bool or ``(B,)`` tensor)."""
        ...

    def edit_conditioning(
        self,
        content: Any,
        *,
        batch: int,
        latent_size: tuple[int, int],
        device: torch.device,
        depth: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        t_s: int = 0,
        chunk_size: int = 8,
        frames_independent: bool = False,
    ) -> tuple[dict, dict]:
        """``(cond, uncond)`` keyword arguments of ``model_fn`` for an edit of ``batch`` clips
        at ``latent_size``: ``uncond`` holds only what the unconditional branch replaces.
        ``frames_independent``: the method runs every frame on its own, so no input of a
        frame may depend on another frame (e.g. depth normalised per frame, not per clip).
        ``content`` is the model's own kind (Gen-1: a CLIP embedding ``(B or 1, 1, D)``; SD: a
        ``PromptEmbedding``)."""
        ...
