"""A Stable Diffusion checkpoint as one image model the editing pipeline runs.

``StableDiffusion`` holds the UNet, the VAE, the text encoder, for SD 2-depth its MiDaS, the
discrete schedule and the parameterisation, and implements the editing pipeline's model
interface (``model.editing.interface``): ``sampling_unet``, ``model_fn``, ``edit_conditioning``.
Conditioning is computed as SD's own code computes it (``ldm/models/diffusion/ddpm.py``):

- text: the prompt's hidden states ``(1, 77, D)`` from the checkpoint's text encoder; the
  unconditional branch is the empty prompt's (or the negative prompt's) hidden states, not
  zeros (``LatentDiffusion.get_learned_conditioning([""])``, diffusers' ``encode_prompt``);
- SD 2-depth (``LatentDepth2ImageDiffusion``): MiDaS depth of each frame, resized bicubic to
  the latent size and normalised per image to [-1, 1] (``2 (d - min) / (max - min + 0.001) - 1``),
  concatenated after the latents; the same for both guidance branches;
- inpainting (``LatentInpaintDiffusion``, diffusers' ``StableDiffusionInpaintPipeline``): the
  mask (1 = repaint) resized nearest to the latent size, then the VAE latents of the frame
  with the masked region zeroed (mid grey), concatenated after the latents in that order;
  without a mask the whole frame is repainted (A1111's img2img with an inpainting model).
  The masked image's latents are the posterior mean (ldm and diffusers draw a sample).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.depth import DepthEstimator
from model.encoders.text import TextEncoder
from model.nets.autoencoder import AutoencoderKL
from model.nets.unet import UNet
from model.sd.config import SDConfig
from model.sd.families import family_name
from model.sd.frame_lora import FrameLoras, frame_lora_rows

DEPTH_EPS = 0.001  # ldm's guard in the per-image depth normalisation


@dataclass
class PromptEmbedding:
    """SD's text conditioning of an edit: the prompt's and the negative prompt's hidden states,
    each ``(1, 77, D)`` float32 (``negative_prompt`` "" is SD's unconditional prompt)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    prompt: str
    negative_prompt: str = ""


def depth_conditioning(depth: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """SD 2-depth's structure input ``(B, F, 1, h, w)`` in [-1, 1] from depth ``(B, F, 1, H, W)``
    (MiDaS inverse depth, any scale): bicubic resize to ``latent_size``, then per image
    ``2 (d - min) / (max - min + 0.001) - 1`` (``LatentDepth2ImageDiffusion.get_input``)."""
    b, f = depth.shape[:2]
    flat = depth.flatten(0, 1).float()
    small = F.interpolate(flat, size=tuple(latent_size), mode="bicubic", align_corners=False)
    low = small.amin(dim=(1, 2, 3), keepdim=True)
    high = small.amax(dim=(1, 2, 3), keepdim=True)
    return (2.0 * (small - low) / (high - low + DEPTH_EPS) - 1.0).unflatten(0, (b, f))


def inpaint_conditioning(
    vae: AutoencoderKL,
    frames: torch.Tensor,
    mask: torch.Tensor | None,
    latent_size: tuple[int, int],
    chunk_size: int = 8,
) -> torch.Tensor:
    """The 5 extra input channels of an inpainting UNet, ``(B, F, 5, h, w)``: the mask resized
    (nearest) to ``latent_size``, then the latents of ``frames`` (``(B, F, 3, H, W)`` in
    [-1, 1]) with the region where ``mask`` (``(B, F or 1, 1, H, W)`` in [0, 1]) >= 0.5
    zeroed. ``mask`` None repaints everything (a mask of ones)."""
    b, f, _, h, w = frames.shape
    device = next(vae.parameters()).device
    if mask is None:
        mask = torch.ones(b, 1, 1, h, w)
    hard = (mask.float() >= 0.5).float().expand(b, f, 1, h, w)
    masked = frames.float().cpu() * (1.0 - hard.cpu())
    parts = [
        vae.encode(masked[:, s : s + chunk_size].to(device)).float()
        for s in range(0, f, chunk_size)
    ]
    latents = torch.cat(parts, dim=1)
    small = F.interpolate(hard.flatten(0, 1), size=tuple(latent_size), mode="nearest")
    return torch.cat([small.unflatten(0, (b, f)).to(latents.device), latents], dim=2)


class StableDiffusion(nn.Module):
    """An SD 1.x / 2.x / 2-depth / inpainting checkpoint as one module.

    ``unet`` takes ``(B, F, C, h, w)`` latents (+ depth or inpainting channels); the VAE maps
    frames in [-1, 1] to latents scaled by the checkpoint's ``scale_factor``; ``text_encoder``
    maps prompts to ``(B, 77, D)``; ``depth`` is SD 2-depth's MiDaS (else None). Build one
    with ``model.sd.loading.load_sd``. ``methods``: the editing methods it runs (the first
    is its default).
    """

    methods = ("mov2mov", "cross_frame", "motion_noise", "multi_frame", "prev_frame")
    takes_control = True  # ControlNet units (``model.sd.control``) act on its UNet

    def __init__(
        self,
        config: SDConfig,
        unet: UNet,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        depth: DepthEstimator | None = None,
        path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if (config.conditioning == "depth") != (depth is not None):
            raise ValueError("a depth model needs its MiDaS, and only a depth model has one")
        self.config = config
        self.unet, self.vae, self.text_encoder, self.depth = unet, vae, text_encoder, depth
        self.schedule = config.schedule()
        self.path = None if path is None else str(path)
        self.frame_loras: FrameLoras | None = None  # keyframed LoRAs (jobs.editing.loras)

    @property
    def parameterization(self) -> str:
        """ "eps" or "v": what the UNet predicts."""
        return self.config.parameterization

    @property
    def uses_depth(self) -> bool:
        """Whether an edit needs the frames' depth (SD 2-depth)."""
        return self.config.conditioning == "depth"

    def sampling_unet(self) -> nn.Module:
        """The UNet sampling runs (there is no separate EMA copy at inference)."""
        return self.unet

    def describe(self) -> dict:
        """What this checkpoint is, as plain data (for an edit's sidecar): family, where the
        architecture came from, parameterisation, text encoder, native resolution."""
        c = self.config
        return {
            "kind": "sd",
            "family": family_name(c),
            "config_source": c.source,
            "parameterization": c.parameterization,
            "conditioning": c.conditioning,
            "text_encoder": c.text_kind,
            "clip_skip": self.text_encoder.clip_skip,
            "native_resolution": c.native_resolution,
            "path": self.path,
        }

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> PromptEmbedding:
        """The hidden states of ``prompt`` and ``negative_prompt`` (None or "": the empty
        prompt, SD's unconditional), both through the checkpoint's text encoder in one call."""
        negative = negative_prompt or ""
        params = list(self.text_encoder.parameters())
        half = next((p.dtype for p in params if p.dtype != torch.float32), None)
        # weights cast to half keep float32 LayerNorms (cast_for_inference): run under autocast
        context = (
            torch.autocast(params[0].device.type, dtype=half) if half else contextlib.nullcontext()
        )
        with context:
            hidden = self.text_encoder.encode([negative, prompt]).float()
        return PromptEmbedding(hidden[1:], hidden[:1], prompt, negative)

    def model_fn(self, unet: nn.Module | None = None) -> Callable[..., torch.Tensor]:
        """``fn(x, t, context, structure=None, concat=None, temporal=False, control=None,
        control_hint=None, lora_scale=None)``: the UNet on the latents with SD 2-depth's
        ``structure`` or inpainting's ``concat`` channels appended, and the residuals of
        ControlNet units (``model.sd.control.Control`` with its stacked hints) added
        (``temporal`` is accepted for the pipeline's sake: an SD UNet has no temporal
        layers); ``lora_scale``
        ``(B, F, L, 1, 1)``: keyframed LoRA weights per frame (``model.sd.frame_lora``)."""
        unet = unet or self.unet

        def fn(
            x, t, context=None, structure=None, concat=None, temporal=False, control=None,
            control_hint=None, lora_scale=None,
        ):  # fmt: skip
            residuals = None
            if control is not None:
                residuals = control.residuals(x, t, context, control_hint)
            extra = [e.to(x.dtype) for e in (structure, concat) if e is not None]
            if extra:
                x = torch.cat([x, *extra], dim=-3)
            with frame_lora_rows(self.frame_loras, lora_scale):
                return unet(x, t, context, temporal=temporal, control=residuals)

        return fn

    def edit_conditioning(
        self,
        content: PromptEmbedding,
        *,
        batch: int,
        latent_size: tuple[int, int],
        device: torch.device,
        depth: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        t_s: int = 0,
        chunk_size: int = 8,
        frames_independent: bool = True,
    ) -> tuple[dict, dict]:
        """``(cond, uncond)`` keyword arguments of ``model_fn`` for an edit of ``batch`` clips:
        ``context`` from ``content`` (a :class:`PromptEmbedding`; ``uncond`` replaces it by
        the negative prompt's), SD 2-depth's ``structure`` from ``depth``, inpainting's
        ``concat`` from ``frames`` and ``mask``. ``t_s`` (Gen-1's depth blur) does not apply;
        every input is per frame already (``frames_independent`` changes nothing)."""
        if not isinstance(content, PromptEmbedding):
            raise TypeError(
                "an SD model is conditioned on a prompt: pass model.encode_prompt(prompt, "
                f"negative_prompt), not {type(content).__name__}"
            )
        # hidden states (1, tokens, D), or per frame (1, F, tokens, D): a keyframe schedule
        cond_states, uncond_states = content.cond.to(device).float(), content.uncond.to(device)
        cond = {"context": cond_states.expand(batch, *cond_states.shape[1:])}
        uncond_states = uncond_states.float().expand(batch, *uncond_states.shape[1:])
        if uncond_states.ndim < cond_states.ndim:  # one negative prompt for every frame
            uncond_states = uncond_states[:, None].expand_as(cond["context"])
        uncond = {"context": uncond_states}
        if self.config.conditioning == "depth":
            if depth is None:
                raise ValueError("an SD 2-depth edit needs the frames' depth")
            cond["structure"] = depth_conditioning(depth, latent_size).to(device)
        if self.config.conditioning == "inpaint":
            if frames is None:
                raise ValueError("an inpainting edit needs the source frames")
            cond["concat"] = inpaint_conditioning(self.vae, frames, mask, latent_size, chunk_size)
        return cond, uncond
