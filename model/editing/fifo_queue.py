"""The queue of a diagonal (fifo) edit (``model.editing.fifo``): its frames at staggered
noise levels, read a block at a time, stepped one level per iteration in calls of at most a
window, decoded and handed on as they leave clean."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from model.diffusion.guidance import MaskedDenoiser, initial_latents, sdedit_steps
from model.diffusion.samplers import resolve_sampler, sample_ddim, sample_dpmpp_2m, sample_euler
from model.diffusion.windows import slice_frames
from model.editing.pipeline import (
    check_control,
    decode_latents,
    encode_frames,
    frame_conditioning,
    latent_mask,
    run_sigmas,
    video_depth,
)
from model.editing.precision import autocast
from model.editing.streaming import LongEditResult, LongWindow, shared_noise
from model.encoders.structure import normalize_clip

# The samplers with a step of one frame on its own (DDIM at eta 0 is Euler on its sigmas).
STEPS = {sample_euler: "euler", sample_ddim: "ddim", sample_dpmpp_2m: "dpmpp_2m"}


@dataclass(eq=False)
class QueuedFrame:
    """One frame in the queue: its latents ``x`` ``(B, 1, C, h, w)`` at the run's sigma of
    ``level`` (steps taken), the level its own SDEdit starts at (a keyframed ``strength``:
    held to its noised source before), its starting ``noise``, ``source`` latents and latent
    ``mask`` (1 = edit), its conditioning, and what the sink gets (input pixels, depth)."""

    index: int
    x: torch.Tensor
    start: int
    noise: torch.Tensor
    source: torch.Tensor | None
    mask: torch.Tensor | None
    cond: dict
    uncond: dict
    pixels: torch.Tensor
    pixel_mask: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    level: int = 0
    old_denoised: torch.Tensor | None = None  # DPM++ 2M's history
    h_last: torch.Tensor | None = None
    made: torch.Tensor | None = field(default=None, repr=False)  # final latents (anchors)


def balanced_parts(count: int, room: int) -> list[slice]:
    """``count`` queued frames in the fewest parts of at most ``room``, of nearly equal size.

    The cuts stay where they are from one iteration to the next, so a frame keeps the same
    neighbours in its call as it moves down the queue: cutting elsewhere each iteration
    spread the cuts' small periodic step evenly but doubled the warp error everywhere on
    the tiny world model (README, "How fifo's defaults were chosen")."""
    parts = -(-count // room)
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class FifoQueue:
    """The state of one diagonal edit: the frames waiting, the anchors made, the blocks
    read ahead; ``run`` drives it to the end."""

    def __init__(
        self, model, method, settings, num_frames, anchors, room, source, depth_estimator,
        generator, autocast_dtype, per_level,
    ) -> None:  # fmt: skip
        self.model, self.method, self.settings = model, method, settings
        self.num_frames, self.anchors, self.room = num_frames, anchors, room
        self.source, self.depth_estimator = source, depth_estimator
        self.generator, self.autocast_dtype = generator, autocast_dtype
        self.per_level = per_level
        unet = model.sampling_unet()
        self.device = next(unet.parameters()).device
        self.channels = unet.out_channels
        sampler, schedule_name = resolve_sampler(settings.sampler, settings.schedule)
        self.kind = STEPS[sampler]
        if source.schedule_of is not None:  # the run starts where the strongest frame does
            strength = source.schedule_of(list(range(num_frames))).get("strength")
            if strength is not None:
                settings = self.settings = replace(settings, strength=float(strength.max()))
        self.sigmas = run_sigmas(model, settings, schedule_name, self.device)
        self.run_levels = sdedit_steps(len(self.sigmas) - 1, settings.strength)
        self.denoiser = method.denoiser(model, settings, False)
        self.common: torch.Tensor | None = None
        self.waiting: list[QueuedFrame] = []  # read ahead, not yet in the queue
        self.queue: list[QueuedFrame] = []
        self.made: dict[int, QueuedFrame] = {}  # anchors that left the queue
        self.next_read = 0

    # -- reading ---------------------------------------------------------------------------

    def read_block(self) -> None:
        """The next ``room`` frames read, conditioned and encoded, their noise drawn."""
        indices = list(range(self.next_read, min(self.next_read + self.room, self.num_frames)))
        self.next_read = indices[-1] + 1
        settings, model = self.settings, self.model
        source = self.source
        frames = source.read_frames(indices)
        batch, n, _, height, width = frames.shape
        factor = model.vae.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the VAE's {factor}")
        size = (height // factor, width // factor)
        control = source.control_of(indices) if source.control_of is not None else None
        check_control(model, control, frames.shape)
        schedule = dict(source.schedule_of(indices)) if source.schedule_of is not None else {}
        self.method.check(settings, n, source.read_mask is not None)
        depth = source.read_depth(indices) if source.read_depth is not None else None
        if depth is None and model.uses_depth:
            depth = video_depth(model, frames, self.depth_estimator, settings.chunk_size)
        mask = source.read_mask(indices) if source.read_mask is not None else None
        content = source.content_for(indices)
        cond, uncond = frame_conditioning(
            model, self.method, content, settings, frames, size, self.device, self.sigmas,
            depth=depth, mask=mask, control=control, schedule=schedule,
        )  # fmt: skip
        if self.common is None:
            self.common = shared_noise(model, frames.shape, self.generator)
        shape = (batch, n, self.channels, *size)
        steps = len(self.sigmas) - 1
        needs_source = settings.strength < 1.0 or mask is not None or "strength" in schedule
        latents = None
        if needs_source and settings.source_latents == "sample":  # drawn first, as diffusers
            latents = encode_frames(
                model.vae, frames, settings.chunk_size, self.device, self.generator
            )
        noise = self.method.noise(
            shape, settings, self.generator, frames.float().cpu(), self.common
        ).to(self.device)
        if needs_source and latents is None:
            latents = encode_frames(model.vae, frames, settings.chunk_size, self.device)
        small = latent_mask(mask, size).to(self.device) if mask is not None else None
        strength = schedule.get("strength")
        for j, index in enumerate(indices):
            own = steps if strength is None else sdedit_steps(steps, float(strength[j]))
            one = slice(j, j + 1)
            self.waiting.append(
                QueuedFrame(
                    index=index,
                    x=noise[:, one],  # placed at the run's first level when it joins
                    start=self.run_levels - own,
                    noise=noise[:, one],
                    source=None if latents is None else latents[:, one],
                    mask=None if small is None else _frame_of(small, j),
                    cond=slice_frames(cond, one, shape),
                    uncond=slice_frames(uncond, one, shape),
                    pixels=frames[:, one].float().cpu(),
                    pixel_mask=None if mask is None else _frame_of(mask, j).float().cpu(),
                    depth=None if depth is None else normalize_clip(depth[:, one].float()).cpu(),
                )
            )

    # -- the queue -------------------------------------------------------------------------

    def run(self, sink, progress: bool) -> LongEditResult:
        result = LongEditResult(anchors=list(self.anchors), method=self.method.name)
        result.method_settings = self.method.describe(self.settings)
        bar = tqdm(total=self.num_frames, desc="fifo edit (frames)", disable=not progress)
        emitted = 0
        while emitted < self.num_frames:
            self.join()
            if self.run_levels:  # strength 0: frames leave as their noised source
                self.step(result)
            done = [f for f in self.queue if f.level >= self.run_levels]
            self.queue = [f for f in self.queue if f.level < self.run_levels]
            if done:
                self.emit(done, sink, result)
                emitted += len(done)
                bar.update(len(done))
        bar.close()
        result.steps_run = self.run_levels
        result.queue = {
            "frames_per_level": self.per_level,
            "levels": self.run_levels,
            "frames": self.per_level * self.run_levels,
            "calls": result.window_calls,
        }
        return result

    def join(self) -> None:
        """New frames into the queue at the first level, as many as share a level."""
        per_level = self.per_level
        while self.next_read < self.num_frames and len(self.waiting) < per_level:
            self.read_block()
        sigma = self.level_sigmas()[0]
        for frame in self.waiting[:per_level]:
            if frame.source is not None:  # SDEdit: the source noised to the first level
                frame.x = frame.source + sigma * frame.noise
            else:
                frame.x = initial_latents(frame.noise, sigma)
            self.queue.append(frame)
        del self.waiting[:per_level]

    def level_sigmas(self) -> torch.Tensor:
        """The sigmas of the run's levels, ending with the last (0 or t = 0's)."""
        return self.sigmas[len(self.sigmas) - 1 - self.run_levels :]

    def step(self, result: LongEditResult) -> None:
        """Every queued frame one step down, the queue in parts of at most ``room``."""
        levels = self.level_sigmas()
        for part in balanced_parts(len(self.queue), self.room):
            frames = self.queue[part]
            kept = [self.made[a] for a in self.anchors if a in self.made]
            sigma = torch.stack([levels[f.level] for f in frames])
            sigma = torch.cat([sigma.min().expand(len(kept)), sigma])[None]
            members = kept + frames
            x = torch.cat([k.made for k in kept] + [f.x for f in frames], dim=1)
            shape = x.shape
            cond = _join_frames([f.cond for f in members], shape)
            uncond = _join_frames([f.uncond for f in members], shape)
            denoiser = self.masked(kept, frames, levels) or self.denoiser
            with autocast(self.device, self.autocast_dtype):
                denoised = denoiser(x, sigma, cond=cond, uncond=uncond).float()
            result.window_calls += 1
            for j, frame in enumerate(frames):
                self.advance(frame, denoised[:, len(kept) + j : len(kept) + j + 1], levels)

    def masked(self, kept, frames, levels) -> MaskedDenoiser | None:
        """The denoiser with the anchors kept as made, frames before their own SDEdit start
        held to their noised source, and the user's mask; None when nothing is kept."""
        held = [f.level < f.start for f in frames]
        if not kept and not any(held) and all(f.mask is None for f in frames):
            return None
        shape = frames[0].noise.shape
        ones = torch.ones(shape[0], 1, 1, *shape[-2:], device=self.device)
        masks = [torch.zeros_like(ones) for _ in kept]
        for frame, hold in zip(frames, held, strict=True):
            mask = frame.mask.expand_as(ones) if frame.mask is not None else ones
            masks.append(torch.zeros_like(ones) if hold else mask)
        zeros = torch.zeros(shape, device=self.device)
        source = [f.made for f in kept] + [
            f.source if f.source is not None else zeros for f in frames
        ]
        noise = [f.noise for f in kept + frames]
        return MaskedDenoiser(
            self.denoiser, torch.cat(source, dim=1), torch.cat(masks, dim=1), torch.cat(noise, 1)
        )

    def advance(self, frame: QueuedFrame, denoised: torch.Tensor, levels) -> None:
        """One sampler step of ``frame`` from its level's sigma to the next."""
        sigma, sigma_next = levels[frame.level], levels[frame.level + 1]
        if self.kind != "dpmpp_2m":  # Euler; DDIM at eta 0 is Euler on its own sigmas
            frame.x = denoised + (frame.x - denoised) * (sigma_next / sigma)
        elif sigma_next == 0:
            frame.x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            d = denoised
            if frame.old_denoised is not None:
                r = frame.h_last / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * frame.old_denoised
            frame.x = (sigma_next / sigma) * frame.x - torch.expm1(-h) * d
            frame.old_denoised, frame.h_last = denoised, h
        frame.level += 1

    def emit(self, done: list[QueuedFrame], sink, result: LongEditResult) -> None:
        """Frames that left the queue clean: decoded, pasted outside the mask, handed on."""
        last = self.level_sigmas()[-1]
        latents = torch.cat([f.x for f in done], dim=1)
        if last > 0:  # latents at the last sigma, back to the model's DDPM space
            latents = latents / (1 + last**2).sqrt()
        with autocast(latents.device, self.autocast_dtype):
            out = decode_latents(self.model.vae, latents, self.settings.chunk_size)
        source = torch.cat([f.pixels for f in done], dim=1)
        if done[0].pixel_mask is not None and self.settings.keep_unmasked_pixels:
            keep = torch.cat([f.pixel_mask for f in done], dim=1)
            out = keep * out + (1 - keep) * source
        depth = None
        if done[0].depth is not None:
            depth = torch.cat([f.depth for f in done], dim=1)
        for j, frame in enumerate(done):
            if frame.index in self.anchors:
                frame.made = latents[:, j : j + 1]
                self.made[frame.index] = frame
        indices = tuple(f.index for f in done)
        sink(LongWindow(tuple(self.anchors), (), indices), out, source, depth)


def _join_frames(parts: list, shape: torch.Size):
    """Frames' conditioning joined along dim 1 (per-frame tensors ``(B, 1, ...)``); values
    every frame shares (a clip's content ``(B, 1, D)``, a ControlNet ``Control``) taken once."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.ndim >= 4 and first.shape[:2] == (shape[0], 1):
            return torch.cat(parts, dim=1)
        return first
    if isinstance(first, dict):
        return {k: _join_frames([p[k] for p in parts], shape) for k in first}
    return first


def _frame_of(video: torch.Tensor, j: int) -> torch.Tensor:
    """Frame ``j`` ``(B, 1, ...)`` of a per-frame ``(B, F, ...)`` tensor, or the one frame
    of a tensor every frame shares ``(B, 1, ...)``."""
    return video[:, j : j + 1] if video.shape[1] > 1 else video
