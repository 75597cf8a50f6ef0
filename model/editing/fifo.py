"""Edits of any length without window seams: FIFO-Diffusion's diagonal denoising (Kim et
al. 2024, "FIFO-Diffusion: Generating Infinite Videos from Text without Training").

A sequential edit (``model.editing.long``) makes a video a window at a time, and where two
windows meet, frames made apart meet: a seam. Here no frame is made apart from its
neighbours. The frames wait in a queue at staggered noise levels, the oldest nearly clean and
the newest just started; every iteration the UNet takes the whole queue one step down, each
frame at its own noise level (a sigma per frame: ``model.diffusion.schedule.batch_sigma``),
the oldest frames leave clean (decoded and handed on at once) and new ones join at the run's
first level. Every frame goes through the same steps beside the frames before and after it,
so nothing marks where one call of the UNet ends and the next begins; memory holds the queue,
never the video. ``per_level`` frames share each level (FIFO-Diffusion's diagonal is one;
by default a third of a call, so that a call spans about three levels: the tiny world
model, trained on clips at one noise level, follows a whole window of levels poorly,
README), so the queue holds ``per_level`` x steps frames and runs in parts of at most
``window_length`` frames (FIFO's latent partitioning). Every frame still takes the run's
steps once: a frame costs ``steps`` frame evaluations whatever ``per_level``.

Anchor frames (``window.anchors``: frames made first, as in a sequential edit) join every
call as made frames, noised to the level of the call's most advanced frame, so that colours
and the subject cannot creep over minutes. The sampler steps each frame on its own: Euler,
DDIM (eta 0) and DPM++ 2M (its history kept per frame) have such a step; other samplers are
refused. Methods that render frame after frame (``prev_frame``, ``multi_frame``) have no
windows to join and are refused too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from model.diffusion.guidance import MaskedDenoiser, initial_latents, sdedit_steps
from model.diffusion.samplers import (
    resolve_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
)
from model.diffusion.windows import slice_frames
from model.editing.methods import SEQUENTIAL, resolve_method
from model.editing.pipeline import (
    check_control,
    decode_latents,
    encode_frames,
    frame_conditioning,
    latent_mask,
    run_sigmas,
    video_depth,
)
from model.editing.precision import autocast, inference_weights
from model.editing.settings import EditSettings, check_settings, temporal_frame_limit
from model.editing.streaming import (
    FrameSource,
    LongEditResult,
    LongWindow,
    Sink,
    shared_noise,
)
from model.encoders.structure import normalize_clip

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


def check_fifo_settings(settings: EditSettings) -> None:
    """``ValueError`` (one line) for a sampler that cannot step a frame on its own, or a
    ``settings.method`` that renders frame after frame (the model's default is checked by
    ``check_fifo``)."""
    names = str(settings.method or "").split("+")
    if SEQUENTIAL & {n.strip() for n in names}:
        raise ValueError(
            f"window.mode=fifo: method {settings.method} renders frame after frame already "
            "(no windows to join); use window.mode=sequential or blend"
        )
    sampler, _ = resolve_sampler(settings.sampler, settings.schedule)
    kind = STEPS.get(sampler)
    if kind is None or (kind == "ddim" and settings.eta):
        raise ValueError(
            f"window.mode=fifo steps every frame on its own: sampler {settings.sampler!r} "
            "has no such step; use euler, ddim (eta 0) or dpmpp_2m"
        )


def check_fifo(model, settings: EditSettings) -> None:
    """``check_fifo_settings``, and the method ``model`` resolves ``settings.method`` to."""
    check_fifo_settings(settings)
    method = resolve_method(model, settings.method)
    check_fifo_settings(replace(settings, method=method.name))


def frames_per_level(room: int, per_level: int | None = None) -> int:
    """Frames that share each noise level of the queue: ``per_level``, or by default a third
    of a call's ``room`` rounded up, so that one UNet call spans about three levels (one
    frame per level, FIFO-Diffusion's own diagonal, spans a whole window of levels: frames
    far apart in noise beside each other, which the tiny world model follows poorly, README);
    ``ValueError`` unless a whole number >= 1."""
    if per_level is None:
        return max(1, -(-room // 3))
    if isinstance(per_level, bool) or not isinstance(per_level, int) or per_level < 1:
        raise ValueError(f"window.frames_per_level must be a whole number >= 1, got {per_level!r}")
    return per_level


def balanced_parts(count: int, room: int) -> list[slice]:
    """``count`` queued frames in the fewest parts of at most ``room``, of nearly equal size."""
    parts = -(-count // room)
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@torch.no_grad()
def edit_fifo_video(
    model,
    num_frames: int,
    source: FrameSource,
    settings: EditSettings,
    sink: Sink,
    anchors: Sequence[int] = (0,),
    *,
    depth_estimator: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    per_level: int | None = None,
) -> LongEditResult:
    """Edit a video of ``num_frames`` frames by diagonal denoising, in memory bounded by the
    queue (``edit_long_video(mode="fifo")`` calls it): ``source`` reads each frame's inputs
    (``model.editing.streaming.FrameSource``), ``sink(window, edited, source, depth)`` gets
    the frames in order as they leave the queue (``window.new`` naming them, ``edited`` and
    ``source`` ``(B, n, 3, H, W)`` in [-1, 1] on the CPU), ``anchors`` are frames of the
    first ``window_length - len(anchors)`` (they join every call once made) and
    ``per_level`` the frames that share a noise level (None: ``frames_per_level``'s).

    Frames are read, conditioned and encoded a window's worth at a time (``window_length``
    minus the anchors), their noise drawn then (the shared part once for the video), so an
    edit whose video fits one such block and whose frames do not see each other (``mov2mov``)
    equals ``edit_video``. Raises ``ValueError`` before any compute for a sampler or method
    that cannot step frame by frame (``check_fifo``), anchors outside the first block, a bad
    ``per_level``, and as ``edit_video`` does for settings.
    """
    check_fifo(model, settings)
    unet = model.sampling_unet()
    check_settings(settings, temporal_frame_limit(unet))
    anchors = sorted({int(a) for a in anchors})
    room = settings.window_length - len(anchors)
    if room < 1:
        raise ValueError(
            f"window.mode=fifo: a window of {settings.window_length} frames leaves no room "
            f"beside {len(anchors)} anchor(s)"
        )
    outside = [a for a in anchors if not 0 <= a < min(room, num_frames)]
    if outside:
        raise ValueError(f"window.mode=fifo: anchors {outside} are not frames of the first {room}")
    per_level = frames_per_level(room, per_level)
    method = resolve_method(model, settings.method)
    estimator = depth_estimator if depth_estimator is not None else model.depth
    networks = [unet, model.vae, estimator if source.read_depth is None else None]
    with inference_weights(settings, autocast_dtype, *networks):
        queue = _Queue(
            model, method, replace(settings, prepack=False), num_frames, anchors, room, source,
            depth_estimator, generator, autocast_dtype, per_level,
        )  # fmt: skip
        return queue.run(sink, progress)


class _Queue:
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
