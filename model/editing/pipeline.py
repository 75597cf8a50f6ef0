"""Gen-1 video editing as a pure library: frames, content and settings in, edited frames out.

The pipeline: depth of the frames (MiDaS, or a given depth) -> structure at latent size,
blurred ``t_s`` times; a content embedding (reference image, text, or a frame); noise (or the
source latents noised, for SDEdit ``strength`` and masked editing); any sampler over Gen-1's
guided denoiser, run in overlapping temporal windows (``model.diffusion.windows``); the VAE
decoding the latents a chunk of frames at a time. No files are read or written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.diffusion.guidance import Gen1Guidance, sample, sdedit_steps
from model.diffusion.noise import frame_noise
from model.diffusion.samplers import DiscreteDenoiser, get_sigmas, resolve_sampler, sampler_kwargs
from model.diffusion.windows import WindowedDenoiser, window_slices
from model.editing.precision import autocast, inference_weights
from model.editing.settings import EditSettings, check_settings, temporal_frame_limit
from model.encoders.structure import normalize_clip


@dataclass
class EditResult:
    """An edited video and what went into it."""

    frames: torch.Tensor  # (B, F, 3, H, W) float32 in [-1, 1], on the CPU
    depth: torch.Tensor | None  # (B, F, 1, H, W) normalised to [-1, 1] (for previews), CPU
    windows: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) of each
    window_calls: int = 0  # denoiser calls on windows, over all steps
    steps_run: int = 0  # sampler steps actually run (fewer than ``steps`` when strength < 1)


def _chunks(num_frames: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, num_frames)) for s in range(0, num_frames, size)]


def video_depth(
    gen1, frames: torch.Tensor, estimator: torch.nn.Module | None = None, chunk_size: int = 8
) -> torch.Tensor:
    """Depth ``(B, F, 1, H, W)`` on the CPU, from ``estimator`` or the model's MiDaS, by chunks."""
    estimator = estimator if estimator is not None else gen1.depth
    if estimator is None:
        raise ValueError(
            "the model has no depth estimator: give the depth of the video, or a MiDaS model"
        )
    device = next(estimator.parameters()).device
    parts = [
        estimator(frames[:, s].to(device)).float().cpu()
        for s in _chunks(frames.shape[1], chunk_size)
    ]
    return torch.cat(parts, dim=1)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask ``(B, F, 1, H, W)`` in [0, 1] (1 = edit) averaged down to ``latent_size``."""
    b, f = mask.shape[:2]
    small = F.interpolate(mask.flatten(0, 1).float(), size=tuple(latent_size), mode="area")
    return small.view(b, f, 1, *latent_size)


def encode_frames(vae, frames: torch.Tensor, chunk_size: int, device) -> torch.Tensor:
    """Posterior-mean latents of ``(B, F, 3, H, W)`` frames, a chunk of frames at a time."""
    parts = [
        vae.encode(frames[:, s].to(device)).float() for s in _chunks(frames.shape[1], chunk_size)
    ]
    return torch.cat(parts, dim=1)


def decode_latents(vae, latents: torch.Tensor, chunk_size: int, progress: bool = False):
    """Pixels ``(B, F, 3, H, W)`` on the CPU in [-1, 1], decoded a chunk of frames at a time,
    so the decoder's activations never hold more than ``chunk_size`` frames."""
    chunks = _chunks(latents.shape[1], chunk_size)
    bar = tqdm(chunks, desc="VAE decode", leave=False, disable=not progress)
    return torch.cat([vae.decode(latents[:, s]).float().clamp(-1, 1).cpu() for s in bar], dim=1)


@torch.no_grad()
def edit_video(
    gen1,
    frames: torch.Tensor,
    content: torch.Tensor,
    settings: EditSettings,
    *,
    depth: torch.Tensor | None = None,
    depth_estimator: torch.nn.Module | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> EditResult:
    """Edit ``frames`` ``(B, F, 3, H, W)`` in [-1, 1] (any device; moved a chunk at a time)
    toward ``content`` ``(B or 1, 1, D)``, keeping the structure of their depth.

    ``depth`` ``(B, F, 1, H, W)`` replaces MiDaS (any monotone inverse-depth scale; it is
    normalised per clip); ``mask`` ``(B, F or 1, 1, H, W)`` in [0, 1] limits the edit to where it
    is 1; ``generator`` (a CPU generator) draws all noise, so a seed reproduces an edit on any
    device; ``autocast_dtype`` (float16 / bfloat16) runs the networks in half precision.
    """
    check_settings(settings, temporal_frame_limit(gen1.unet))
    device = next(gen1.unet.parameters()).device
    batch, num_frames, _, height, width = frames.shape
    factor = gen1.vae.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE's {factor}")
    size = (height // factor, width // factor)
    networks = [gen1.denoiser_model(use_ema=True), gen1.vae]
    if gen1.structure_channels and depth is None:
        networks.append(depth_estimator if depth_estimator is not None else gen1.depth)
    prepacked = inference_weights(settings, autocast_dtype, *networks)
    with autocast(device, autocast_dtype), prepacked:
        if gen1.structure_channels and depth is None:
            depth = video_depth(gen1, frames, depth_estimator, settings.chunk_size)
        structure = None
        if gen1.structure_channels:
            structure = gen1.structure(None, size, settings.t_s, depth=depth.float()).to(device)
        sampler, schedule_name = resolve_sampler(settings.sampler, settings.schedule)
        sigmas = get_sigmas(schedule_name, settings.steps, gen1.schedule, device=device)
        shape = (batch, num_frames, gen1.unet.out_channels, *size)
        noise = frame_noise(shape, settings.noise_correlation, generator).to(device)
        source, small_mask = None, None
        if settings.strength < 1.0 or mask is not None:
            source = encode_frames(gen1.vae, frames, settings.chunk_size, device)
        if mask is not None:
            small_mask = latent_mask(mask, size).to(device)
        inner = DiscreteDenoiser(
            gen1.model_fn(gen1.denoiser_model(use_ema=True)),
            gen1.schedule,
            gen1.hparams.parameterization,
        )
        windowed = WindowedDenoiser(
            Gen1Guidance(inner, settings.w, settings.w_t),
            settings.window_length,
            settings.window_overlap,
            progress=progress,
        )
        content = content.to(device).float().expand(batch, -1, -1)
        cond = {"context": content, "structure": structure}
        latents = sample(
            sampler,
            windowed,
            noise,
            sigmas,
            source=source,
            strength=settings.strength,
            mask=small_mask,
            extra_args={"cond": cond, "uncond": {"context": torch.zeros_like(content)}},
            disable=not progress,
            **sampler_kwargs(sampler, settings.eta, generator),
        )
        out = decode_latents(gen1.vae, latents, settings.chunk_size, progress)
    if mask is not None and settings.keep_unmasked_pixels:
        keep = mask.float().cpu()
        out = keep * out + (1 - keep) * frames.float().cpu()
    windows = window_slices(num_frames, settings.window_length, settings.window_overlap)
    return EditResult(
        frames=out,
        depth=normalize_clip(depth.float()) if depth is not None else None,
        windows=[(w.start, w.stop) for w in windows],
        window_calls=windowed.windows_seen,
        steps_run=sdedit_steps(settings.steps, settings.strength),
    )
