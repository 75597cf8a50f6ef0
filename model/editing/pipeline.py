"""Video editing as a pure library: frames, content and settings in, edited frames out.

One pipeline for every model (a Gen-1 video model, an SD checkpoint: the interface of
``model.editing.interface``) and every method (``model.editing.methods``): the frames' depth
when the model uses it (MiDaS, or a given depth); the model's conditioning of the content
(Gen-1: depth structure blurred ``t_s`` times and a CLIP embedding; SD: the prompt's hidden
states, SD 2-depth's depth, inpainting's mask channels); the method's starting noise (or the
source latents noised, for SDEdit ``strength`` and masked editing); any sampler over the
method's guided denoiser (``model.diffusion.windows`` bounds its frames per call); the VAE
decoding the latents a chunk of frames at a time. No files are read or written here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model.diffusion.guidance import Release, sdedit_steps
from model.diffusion.samplers import get_sigmas, resolve_sampler, sampler_kwargs
from model.diffusion.windows import window_slices
from model.editing.keyframes import lora_keys
from model.editing.methods import SamplingRun, resolve_method
from model.editing.precision import autocast, inference_weights
from model.editing.settings import EditSettings, check_settings, temporal_frame_limit
from model.encoders.structure import normalize_clip
from model.sd.control import Control


@dataclass
class EditResult:
    """An edited video and what went into it."""

    frames: torch.Tensor  # (B, F, 3, H, W) float32 in [-1, 1], on the CPU
    depth: torch.Tensor | None  # (B, F, 1, H, W) normalised to [-1, 1] (for previews), CPU
    windows: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) of each
    window_calls: int = 0  # denoiser calls on windows, over all steps
    steps_run: int = 0  # sampler steps actually run (fewer than ``steps`` when strength < 1)
    method: str = ""  # the editing method that ran (``model.editing.methods``)
    method_settings: dict = field(default_factory=dict)  # its own settings, for the sidecar
    # The final latents (B, F, C, h, w) in the model's DDPM space, for every frame (also the
    # carried ones): what a sequential long edit passes to its next window.
    latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None  # the starting noise of every frame, (B, F, C, h, w)


@dataclass
class Carry:
    """Frames of an edit that are already made (``model.editing.long``): their final
    ``latents`` ``(B, F, C, h, w)`` and the ``noise`` they were made from, at the frames where
    ``known`` ``(F,)`` (bool) is set (other frames' values are ignored). Known frames stay
    fixed through sampling (their latents noised to each step's sigma, as masked editing
    keeps the unmasked region), so the other frames are sampled to continue them; only the
    other frames are decoded."""

    latents: torch.Tensor
    noise: torch.Tensor
    known: torch.Tensor
    # (F,) in [0, 1]: the share of the run's steps each known frame is held for (then it is
    # sampled on from where it is: a long edit's overlap, blended afterwards); None: all.
    hold: torch.Tensor | None = None

    def check(self, shape: tuple[int, ...]) -> None:
        """``ValueError`` unless latents and noise are ``shape`` and ``known`` has F flags."""
        for name in ("latents", "noise"):
            value = getattr(self, name)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"carried {name} {tuple(value.shape)} must be {tuple(shape)}")
        if tuple(self.known.shape) != (shape[1],) or self.known.dtype != torch.bool:
            raise ValueError(f"carry.known must be a bool tensor of {shape[1]} frames")


def check_control(model, control: Control | None, video_shape: torch.Size) -> None:
    """ControlNet units only on a model that takes them, with hints ``(1 or B, F, C, H, W)``
    at the frames' size; ``ValueError`` otherwise."""
    if control is None:
        return
    if not getattr(model, "takes_control", False):
        raise ValueError(f"ControlNet units need an SD checkpoint, not a {type(model).__name__}")
    batch, num_frames, _, height, width = video_shape
    for unit in control.units:
        b, f, _, h, w = unit.hint.shape
        if b not in (1, batch) or (f, h, w) != (num_frames, height, width):
            raise ValueError(
                f"ControlNet {unit.label} hint {tuple(unit.hint.shape)} does not fit the "
                f"{num_frames} frames of {height}x{width}"
            )


def _chunks(num_frames: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, num_frames)) for s in range(0, num_frames, size)]


def video_depth(
    model, frames: torch.Tensor, estimator: torch.nn.Module | None = None, chunk_size: int = 8
) -> torch.Tensor:
    """Depth ``(B, F, 1, H, W)`` on the CPU, from ``estimator`` or the model's MiDaS, by chunks."""
    estimator = estimator if estimator is not None else model.depth
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


def encode_frames(
    vae, frames: torch.Tensor, chunk_size: int, device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Latents of ``(B, F, 3, H, W)`` frames, a chunk of frames at a time: the posterior mean,
    or with ``generator`` a draw from the posterior (frame by frame, in order)."""
    sample = generator is not None
    parts = [
        vae.encode(frames[:, s].to(device), sample, generator).float()
        for s in _chunks(frames.shape[1], chunk_size)
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
    model,
    frames: torch.Tensor,
    content,
    settings: EditSettings,
    *,
    depth: torch.Tensor | None = None,
    depth_estimator: torch.nn.Module | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    control: Control | None = None,
    carry: Carry | None = None,
    common: torch.Tensor | None = None,
    schedule: Mapping[str, torch.Tensor] | None = None,
) -> EditResult:
    """Edit ``frames`` ``(B, F, 3, H, W)`` in [-1, 1] (any device; moved a chunk at a time)
    with ``model`` (a Gen-1 model or an SD checkpoint: ``model.editing.interface``) toward
    ``content``, by ``settings.method`` (None: the model's default; ``model.editing.methods``).

    ``content``: what the model is conditioned on (Gen-1: a CLIP embedding ``(B or 1, 1, D)``;
    SD: ``model.encode_prompt(prompt, negative_prompt)``). ``depth`` ``(B, F, 1, H, W)``
    replaces MiDaS for models that use depth (any monotone inverse-depth scale); ``mask``
    ``(B, F or 1, 1, H, W)`` in [0, 1] limits the edit to where it is 1; ``generator`` (a CPU
    generator) draws all noise, so a seed reproduces an edit on any device;
    ``autocast_dtype`` (float16 / bfloat16) runs the networks in half precision.
    ``control``: ControlNet units with their hints (``model.sd.control``; SD models only),
    acting with every method, sampler, window and mask. ``carry``: frames already made
    (``Carry``; a sequential long edit's anchors and overlap), kept fixed; the result's
    ``frames`` are then only the other frames, in order. ``common`` ``(B, 1, C, h, w)``: the
    part of the starting noise the frames share (the method's, e.g. PYoCo's mixed noise, one
    shared draw for mov2mov), given by a long edit so that every window shares the same.
    ``schedule``: settings per frame, ``(F,)`` tensors (``model.editing.keyframes``) of any
    of ``t_s`` (rounded), ``w``, ``w_t``, ``strength`` (each frame starts its SDEdit at
    its own step: held to its noised source until then) and LoRA weights ``lora.<i>`` (for
    a model with ``frame_loras``: ``model.sd.frame_lora``); content per frame is given as
    ``content`` with a frame axis (Gen-1 ``(B or 1, F, 1, D)``, SD hidden states ``(1, F,
    tokens, D)``).
    Raises ``ValueError`` for settings out of range, a method the model does not run, a
    frame size that is not a multiple of the VAE's factor, or hints that do not fit.
    """
    schedule = dict(schedule or {})
    if "strength" in schedule:  # the run starts where the strongest frame does
        settings = replace(settings, strength=float(schedule["strength"].max()))
    method = resolve_method(model, settings.method)
    unet = model.sampling_unet()
    check_settings(settings, temporal_frame_limit(unet))
    device = next(unet.parameters()).device
    batch, num_frames, _, height, width = frames.shape
    method.check(settings, num_frames, mask is not None)
    factor = model.vae.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE's {factor}")
    size = (height // factor, width // factor)
    check_control(model, control, frames.shape)
    needs_depth = model.uses_depth and depth is None
    networks = [unet, model.vae]
    if needs_depth:
        networks.append(depth_estimator if depth_estimator is not None else model.depth)
    prepacked = inference_weights(settings, autocast_dtype, *networks)
    with autocast(device, autocast_dtype), prepacked:
        if needs_depth:
            depth = video_depth(model, frames, depth_estimator, settings.chunk_size)
        sampler, schedule_name = resolve_sampler(settings.sampler, settings.schedule)
        sigmas = run_sigmas(model, settings, schedule_name, device)
        cond, uncond = frame_conditioning(
            model, method, content, settings, frames, size, device, sigmas,
            depth=depth, mask=mask, control=control, schedule=schedule,
        )  # fmt: skip
        shape = (batch, num_frames, unet.out_channels, *size)
        if carry is not None:
            carry.check(shape)
        new = carry_new_frames(carry, num_frames)
        source, small_mask = None, None
        needs_source = settings.strength < 1.0 or mask is not None or carry is not None
        needs_source = needs_source or "strength" in schedule
        if needs_source and settings.source_latents == "sample":  # drawn first, as diffusers
            source = encode_frames(
                model.vae, frames[:, new], settings.chunk_size, device, generator
            )
        noise = method.noise(shape, settings, generator, frames.float().cpu(), common).to(device)
        if needs_source and source is None:
            source = encode_frames(model.vae, frames[:, new], settings.chunk_size, device)
        if mask is not None:
            small_mask = latent_mask(mask, size).to(device)
        user_mask, release = small_mask, None
        if carry is not None:
            noise, source, small_mask = with_carry(carry, noise, source, small_mask, new)
        if (carry is not None and carry.hold is not None) or "strength" in schedule:
            release, small_mask = frame_release(
                sigmas, settings, shape, user_mask, small_mask, carry, schedule.get("strength")
            )
        denoiser = method.denoiser(model, settings, progress)
        step_kwargs = sampler_kwargs(sampler, settings.eta, generator)
        step_noise = method.step_noise(shape, generator, device)
        if step_noise is not None and "generator" in step_kwargs:  # a stochastic sampler
            step_kwargs["noise_sampler"] = step_noise
        sampling = SamplingRun(
            sampler,
            denoiser,
            noise,
            sigmas,
            source=source,
            strength=settings.strength,
            mask=small_mask,
            extra_args={"cond": cond, "uncond": uncond},
            sampler_kwargs=step_kwargs,
            frames=frames.float().cpu(),
            factor=factor,
            settings=settings,
            disable=not progress,
            release=release,
        )
        latents = method.render(sampling)  # one sampling run, or one per frame (the method's)
        if sigmas[-1] > 0:  # latents at the last sigma, back to the model's DDPM space
            latents = latents / (1 + sigmas[-1] ** 2).sqrt()
        out = decode_latents(model.vae, latents[:, new], settings.chunk_size, progress)
    if mask is not None and settings.keep_unmasked_pixels:
        keep = mask.float().cpu()
        keep = keep[:, new] if keep.shape[1] == num_frames else keep
        out = keep * out + (1 - keep) * frames[:, new].float().cpu()
    windows = window_slices(num_frames, settings.window_length, denoiser.overlap)
    return EditResult(
        frames=out,
        depth=normalize_clip(depth.float()) if depth is not None else None,
        windows=[(w.start, w.stop) for w in windows],
        window_calls=denoiser.windows_seen,
        steps_run=sdedit_steps(settings.steps, settings.strength),
        method=method.name,
        method_settings=method.describe(settings),
        latents=latents.float(),
        noise=noise,
    )


def run_sigmas(model, settings: EditSettings, schedule_name: str, device) -> torch.Tensor:
    """The ``settings.steps + 1`` sigmas of the whole schedule (an SDEdit run keeps the last
    ``sdedit_steps``), ending at 0, or at t = 0's noise level without ``set_alpha_to_one``."""
    sigmas = get_sigmas(schedule_name, settings.steps, model.schedule, device=device)
    if not settings.set_alpha_to_one:  # end on t = 0's noise level, as SD's DDIM configs
        sigmas[-1] = model.schedule.sigmas[0]
    return sigmas


def frame_conditioning(
    model,
    method,
    content,
    settings: EditSettings,
    frames: torch.Tensor,
    size: tuple[int, int],
    device,
    sigmas: torch.Tensor,
    *,
    depth: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    control: Control | None = None,
    schedule: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict, dict]:
    """``(cond, uncond)`` of the guided denoiser for ``frames`` ``(B, F, 3, H, W)``: the
    model's conditioning of ``content`` (and ``depth`` ``(B, F, 1, H, W)``, ``mask``), the
    method's extra inputs, per-frame guidance scales and LoRA weights of a keyframe
    ``schedule`` (``(F,)`` tensors), and ControlNet units acting on the steps of the run
    that ``sigmas`` (the whole schedule) and ``settings.strength`` give."""
    schedule = schedule or {}
    batch, num_frames = frames.shape[:2]
    cond, uncond = model.edit_conditioning(
        content,
        batch=batch,
        latent_size=size,
        device=device,
        depth=None if depth is None else depth.float(),
        frames=frames,
        mask=mask,
        t_s=schedule["t_s"].round().long()[None] if "t_s" in schedule else settings.t_s,
        chunk_size=settings.chunk_size,
        frames_independent=method.frames_independent,
    )
    cond = {**cond, **method.cond_extra()}
    for name in ("w", "w_t"):  # per-frame guidance scales, read by the guidance
        if name in schedule:
            scale = schedule[name].float().view(1, num_frames, 1, 1, 1)
            cond[f"guidance_{name}"] = scale.expand(batch, -1, -1, -1, -1).to(device)
    if lora_keys(schedule):  # keyframed LoRA weights, read by the model (FrameLoras)
        weights = torch.stack([schedule[k].float() for k in lora_keys(schedule)], dim=-1)
        weights = weights.view(1, num_frames, -1, 1, 1).expand(batch, -1, -1, -1, -1)
        cond["lora_scale"] = weights.to(device)
    if control is not None:  # units act on a fraction of the steps the run takes
        n = len(sigmas) - 1  # sample() keeps the last sdedit_steps(n, strength) steps
        run = sigmas[n - sdedit_steps(n, settings.strength) : -1]
        cond["control"] = control.for_steps(model.schedule.sigma_to_t(run))
        cond["control_hint"] = control.stacked_hints().expand(batch, -1, -1, -1, -1).to(device)
    return cond, uncond


def frame_release(
    sigmas: torch.Tensor,
    settings: EditSettings,
    shape: tuple[int, ...],
    user_mask: torch.Tensor | None,
    mask: torch.Tensor | None,
    carry: Carry | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[Release, torch.Tensor]:
    """When each frame's kept region is let go, and the latent mask to start from: a carried
    frame after ``carry.hold`` of the steps the run takes (held throughout without it); a
    frame of lower ``strength`` ``(F,)`` than the run's at the step its own SDEdit starts,
    held to its noised source until then (mask 0). Let go, a frame keeps what the user's
    mask ``(B, F or 1, 1, h, w)`` keeps, nothing without one."""
    batch, num_frames = shape[:2]
    n = len(sigmas) - 1
    run = sigmas[n - sdedit_steps(n, settings.strength) :].cpu()
    steps = len(run) - 1
    at = torch.full((num_frames,), steps)  # the step each frame is let go at (steps: never)
    known = torch.zeros(num_frames, dtype=torch.bool)
    if carry is not None:
        known = carry.known.cpu()
        if carry.hold is not None:
            held = (carry.hold.cpu().float() * steps).round().long().clamp(0, steps)
            at = torch.where(known, held, at)
    if mask is None:
        mask = torch.ones(batch, num_frames, 1, *shape[-2:], device=sigmas.device)
    mask = mask.expand(batch, num_frames, -1, -1, -1).clone()
    if strength is not None:
        own = torch.tensor([steps - sdedit_steps(n, float(s)) for s in strength.cpu()])
        later = ~known & (own > 0)
        at = torch.where(later, own.clamp(max=steps), at)
        mask[:, later.to(mask.device)] = 0.0  # held to the source until their own start
    sigma = torch.where(at < steps, run[at.clamp(max=steps)] + 1e-6, torch.full_like(run[at], -1))
    after = torch.ones_like(mask) if user_mask is None else user_mask.expand_as(mask)
    return Release(sigma.view(1, -1, 1, 1, 1).to(sigmas.device), after), mask


def carry_new_frames(carry: Carry | None, num_frames: int) -> torch.Tensor:
    """Indices ``(F_new,)`` of the frames an edit makes (all without ``carry``)."""
    if carry is None:
        return torch.arange(num_frames)
    return torch.nonzero(~carry.known.cpu()).flatten()


def with_carry(carry: Carry, noise, source, small_mask, new: torch.Tensor):
    """Noise, source latents (made for the ``new`` frames) and latent mask of a whole window,
    with the carried frames' own noise and latents in place and their mask 0 (kept)."""
    known = carry.known.to(noise.device)
    noise = torch.where(known.view(1, -1, 1, 1, 1), carry.noise.to(noise), noise)
    full = carry.latents.to(noise).clone()
    full[:, new.to(noise.device)] = source
    batch, num_frames = noise.shape[:2]
    if small_mask is None:
        small_mask = torch.ones(batch, num_frames, 1, *noise.shape[-2:], device=noise.device)
    small_mask = small_mask.expand(batch, num_frames, -1, -1, -1).clone()
    small_mask[:, known] = 0.0
    return noise, full, small_mask
