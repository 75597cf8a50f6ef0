"""Gen-1 video editing as a pure library: frames, content and settings in, edited frames out.

The pipeline: depth of the frames (MiDaS, or a given depth) -> structure at latent size,
blurred ``t_s`` times; a content embedding (reference image, text, or a frame); noise (or the
source latents noised, for SDEdit ``strength`` and masked editing); any sampler over Gen-1's
guided denoiser, run in overlapping temporal windows (``model.windows``); the VAE decoding
the latents a chunk of frames at a time. No files are read or written here (see ``infer.py``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.diffusion import correlate_frames
from model.guidance import Gen1Guidance, sample
from model.prepack import prepacked_weights
from model.samplers import DiscreteDenoiser, get_sigmas, resolve_sampler
from model.structure import normalize_clip
from model.temporal import TemporalAttention
from model.windows import WindowedDenoiser, window_slices

PROMPT_MODES = ("prior", "direct")


@dataclass
class EditSettings:
    """Sampling settings of one edit (see ``configs/infer.yaml`` for their meaning)."""

    steps: int = 20
    sampler: str = "dpmpp_2m"
    schedule: str | None = None  # None: the sampler's default (karras; leading for ddim)
    t_s: int = 3
    w: float = 7.5
    w_t: float = 1.0
    strength: float = 1.0
    noise_correlation: float = 0.0  # share of the initial noise common to all frames (0..1)
    eta: float | None = None  # stochastic samplers only; None keeps the sampler's default
    window_length: int = 8
    window_overlap: int = 2
    chunk_size: int = 8  # frames per VAE / depth call
    keep_unmasked_pixels: bool = True  # paste source pixels outside the mask after decoding
    prepack: bool = True  # fp32 on the CPU: weights prepacked for oneDNN (model.prepack)


def settings_from_config(config: Mapping, **overrides) -> EditSettings:
    """The :class:`EditSettings` of an ``infer.py`` / ``eval.py`` config: its keys named as the
    fields, ``window.length`` / ``window.overlap``, then ``overrides``; absent keys keep the
    defaults."""
    values = {f.name: config[f.name] for f in fields(EditSettings) if f.name in config}
    window = config.get("window") or {}
    for key in ("length", "overlap"):
        if key in window:
            values[f"window_{key}"] = window[key]
    return EditSettings(**{**values, **overrides})


@dataclass
class EditResult:
    """An edited video and what went into it."""

    frames: torch.Tensor  # (B, F, 3, H, W) float32 in [-1, 1], on the CPU
    depth: torch.Tensor | None  # (B, F, 1, H, W) normalised to [-1, 1] (for previews), CPU
    windows: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) of each
    window_calls: int = 0  # denoiser calls on windows, over all steps


def image_content(gen1, images: torch.Tensor) -> torch.Tensor:
    """Content ``(B, 1, D)`` from reference images ``(B, 3, H, W)`` in [-1, 1]."""
    device = next(gen1.clip.parameters()).device
    return gen1.encode_content(images.to(device)).float()


def text_content(
    gen1, prompts: str | list[str], mode: str = "prior", prior: Callable | None = None
) -> torch.Tensor:
    """Content ``(B, 1, D)`` from text: CLIP text embedding through ``prior`` (mode "prior",
    as DALL-E 2's prior maps text to image embeddings), or as is (mode "direct")."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {mode!r}")
    if mode == "prior" and prior is None:
        raise ValueError(
            "a prompt needs a prior that maps CLIP text to image embeddings, and none is "
            "configured; set prompt_mode=direct to use the CLIP text embedding as is"
        )
    embedding = gen1.clip.encode_text(prompts).float()
    return (prior(embedding) if mode == "prior" else embedding)[:, None]


def cast_for_inference(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating weights to ``dtype`` in place, except normalisation layers, which stay
    float32 (their statistics need it, and LDM's GroupNorm32 feeds them float32 inputs). Run
    the module under ``torch.autocast`` with the same dtype."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for layer in module.modules():
        if isinstance(layer, norms):
            continue
        for tensor in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
    return module


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def inference_weights(settings: EditSettings, dtype: torch.dtype | None, *networks):
    """A context in which the networks an edit runs hold weights prepacked for oneDNN, when
    ``settings.prepack`` and they run in fp32 on the CPU (elsewhere a no-op)."""
    stack = contextlib.ExitStack()
    if settings.prepack and dtype is None:
        for net in {id(n): n for n in networks if n is not None}.values():
            stack.enter_context(prepacked_weights(net))
    return stack


def temporal_frame_limit(unet: torch.nn.Module) -> int | None:
    """The most frames the UNet's temporal attention takes (its position table), if it has any."""
    limits = [m.max_frames for m in unet.modules() if isinstance(m, TemporalAttention)]
    return min(limits) if limits else None


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
    bar = tqdm(chunks, desc="decode", leave=False, disable=not progress)
    return torch.cat([vae.decode(latents[:, s]).float().clamp(-1, 1).cpu() for s in bar], dim=1)


def frame_noise(
    shape: tuple[int, ...], correlation: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unit Gaussian noise ``(B, F, C, h, w)`` whose frames correlate by ``correlation``
    (``model.diffusion.correlate_frames``): 0 gives independent frames (exactly
    ``torch.randn(shape)``, so seeds keep their edits), 1 the same noise for every frame."""
    noise = torch.randn(shape, generator=generator)
    return correlate_frames(noise, correlation, generator) if correlation > 0.0 else noise


def _sampler_kwargs(sampler: Callable, eta: float | None, generator) -> dict:
    params = inspect.signature(sampler).parameters
    kwargs = {"generator": generator} if "generator" in params else {}
    if eta is not None:
        if "eta" not in params:
            raise ValueError(f"sampler {sampler.__name__} is deterministic: it takes no eta")
        kwargs["eta"] = eta
    return kwargs


def check_settings(settings: EditSettings, max_frames: int | None = None) -> None:
    """Raise ValueError naming the first setting that is out of range."""
    if settings.steps < 1:
        raise ValueError(f"steps must be >= 1, got {settings.steps}")
    if settings.t_s < 0:
        raise ValueError(f"t_s must be >= 0, got {settings.t_s}")
    if not 0.0 <= settings.strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {settings.strength}")
    if not 0.0 <= settings.noise_correlation <= 1.0:
        raise ValueError(f"noise_correlation must be in [0, 1], got {settings.noise_correlation}")
    if settings.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {settings.chunk_size}")
    window_slices(1, settings.window_length, settings.window_overlap)
    if max_frames is not None and settings.window_length > max_frames:
        raise ValueError(
            f"window length {settings.window_length} exceeds the {max_frames} frames the "
            "model's temporal attention takes (unet.temporal_max_frames)"
        )
    sampler, _ = resolve_sampler(settings.sampler, settings.schedule)
    _sampler_kwargs(sampler, settings.eta, None)  # eta only for the stochastic samplers


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
            **_sampler_kwargs(sampler, settings.eta, generator),
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
    )
