"""infer.py's job as one function of its config: check, read, load, edit, write."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sys
import time

import torch
from omegaconf import DictConfig

from jobs.editing.control import control_units, describe_control
from jobs.editing.inputs import read_inputs, sequential
from jobs.editing.keyframes import keyframe_schedule, prompt_route, requested_keyframes
from jobs.editing.loras import apply_loras, requested_loras
from jobs.editing.models import content_embedding, load_model, prompt_prior
from jobs.editing.outputs import describe, output_files
from jobs.editing.request import (
    checkpoint_kind_of,
    device_and_dtype,
    edit_settings,
    resolve_checkpoint_defaults,
)
from model.diffusion.guidance import sdedit_steps
from model.diffusion.windows import window_slices
from model.editing.fifo import fifo_room, frames_per_level
from model.editing.keyframes import lora_keys
from model.editing.long import edit_long_video, long_windows
from model.editing.pipeline import edit_video

log = logging.getLogger("infer")


def announce(cfg: DictConfig, inputs, device, dtype, factor: int) -> None:
    """One line, before the long part, of what is about to happen."""
    settings = edit_settings(cfg)
    (h, w), (ph, pw) = inputs.geometry.output, inputs.geometry.working
    count, length, overlap = len(inputs.indices), settings.window_length, settings.window_overlap
    mode = cfg.window.get("mode", "blend")
    steps = sdedit_steps(settings.steps, settings.strength)
    if mode == "fifo":  # no windows: a queue at staggered levels, in calls of a window
        anchors = set(cfg.window.anchors)
        per_level = frames_per_level(fifo_room(length, anchors), cfg.window.get("frames_per_level"))
        layout = (
            f"a queue of up to {per_level * steps} frames ({per_level} per noise level) in "
            f"UNet calls of up to {length}, by diagonal denoising (fifo)"
        )
    else:
        if sequential(cfg):
            windows = long_windows(count, length, overlap, list(cfg.window.anchors))
        else:
            windows = window_slices(count, length, overlap)
        layout = f"{len(windows)} window(s) of up to {length} frames"
        layout += ", window after window (sequential)" if mode == "sequential" else ""
    padded = f" (padded to {pw}x{ph})" if (h, w) != (ph, pw) else ""
    log.info(
        "editing %d frames at %dx%d%s, latents %dx%d, %s, %d of %d %s steps, on %s in %s",
        len(inputs.indices),
        w,
        h,
        padded,
        pw // factor,
        ph // factor,
        layout,
        steps,
        settings.steps,
        settings.sampler,
        device,
        str(dtype or torch.float32).removeprefix("torch."),
    )


def run(cfg: DictConfig) -> dict:
    """Edit ``cfg.input`` into ``cfg.output``; returns the sidecar dict plus ``result`` (for
    a sequential edit, whose frames went to the file as they were made, a ``LongEditResult``)."""
    clock = [time.perf_counter()]
    kind = checkpoint_kind_of(cfg)
    resolve_checkpoint_defaults(cfg, kind)
    loras = requested_loras(cfg)  # read and checked before any input is decoded
    inputs = read_inputs(cfg, kind)
    keys = requested_keyframes(cfg, kind, len(inputs.indices))
    clock.append(time.perf_counter())
    device, dtype = device_and_dtype(cfg)
    model, estimator = load_model(cfg, inputs, device, dtype, kind)
    keyframed = any(lora_keys(key.values) for key in keys)
    applied_loras = apply_loras(model, loras, kind, keyframed)
    nets = control_units(cfg, model, inputs, estimator, device, dtype)
    clock.append(time.perf_counter())
    seed = int(cfg.seed) if cfg.seed is not None else secrets.randbelow(2**31)
    announce(cfg, inputs, device, dtype, model.vae.downsample_factor)
    content = content_embedding(cfg, model, inputs, device, dtype, kind, seed)
    keyframes = None
    if keys:
        prior = None
        if kind != "sd" and cfg.prompt_mode == "prior" and any(k.prompt for k in keys):
            prior = prompt_prior(cfg, model.clip.embed_dim, device, seed)
        route = prompt_route(cfg, model, kind, prior)
        weights = [weight for _, weight in loras]
        keyframes = keyframe_schedule(
            cfg, keys, model, kind, content, device, dtype, route, weights
        )
    edit = dict(
        generator=torch.Generator().manual_seed(seed),
        autocast_dtype=dtype,
        # Bars redraw in place: on a terminal only; a log file gets the lines around them.
        progress=cfg.progress and sys.stderr.isatty(),
    )
    with output_files(cfg, inputs, clock[0]) as outputs:
        if sequential(cfg):
            result = edit_in_windows(
                cfg, inputs, model, estimator, nets, content, outputs, edit, keyframes
            )
            clock.append(time.perf_counter())  # the frames were written as they were made
        else:
            positions = list(range(len(inputs.indices)))
            schedule = None
            if keyframes is not None:
                content = keyframes.content_of(positions)
                schedule = keyframes.schedule_of(positions)
            control = None
            if nets is not None:
                control = nets.control(
                    model, inputs.frames, inputs.depth, estimator, inputs.hints, positions
                )
            result = edit_video(
                model,
                inputs.frames,
                content,
                edit_settings(cfg),
                depth=inputs.depth,
                depth_estimator=estimator,
                mask=inputs.mask,
                control=control,
                schedule=schedule,
                **edit,
            )
            clock.append(time.perf_counter())
            outputs.add(result.frames[0], inputs.frames[0], _first(result.depth))
            geometry = inputs.geometry
            depth = geometry.crop(result.depth) if result.depth is not None else None
            result = dataclasses.replace(result, frames=geometry.crop(result.frames), depth=depth)
        sidecar = describe(cfg, inputs, result, seed, model, device, dtype, kind)
        sidecar["lora"] = applied_loras
        if nets is not None:
            sidecar["controlnet"] = describe_control(cfg)
        if keyframes is not None:
            sidecar["keyframes"] = keyframes.describe(len(inputs.indices))
        phases = ("read_s", "load_s", "edit_s")
        sidecar["timing"] = {
            k: b - a for k, a, b in zip(phases, clock[:-1], clock[1:], strict=True)
        }
        outputs.sidecar = sidecar
    return {**sidecar, "result": result}


def _first(video: torch.Tensor | None) -> torch.Tensor | None:
    return None if video is None else video[0]


def edit_in_windows(cfg, inputs, model, estimator, nets, content, outputs, edit, keyframes):
    """A streaming edit: window after window (``model.editing.long``: each window's frames
    read from the input file, edited beside the frames carried into it) or through a queue
    at staggered noise levels (``model.editing.fifo``); frames are written as soon as they
    are made."""
    window = cfg.window

    def part(video: torch.Tensor | None):
        return None if video is None else lambda positions: video[:, positions]

    def control_of(positions: list[int]):
        depth = inputs.depth[:, positions] if inputs.depth is not None else None
        frames = inputs.read_window(positions)
        return nets.control(model, frames, depth, estimator, inputs.hints, positions)

    def mask_of(positions: list[int]):
        mask = inputs.mask
        return mask if mask.shape[1] == 1 else mask[:, positions]

    return edit_long_video(
        model,
        len(inputs.indices),
        inputs.read_window,
        content,
        edit_settings(cfg),
        lambda _, edited, source, depth: outputs.add(edited[0], source[0], _first(depth)),
        anchors=list(window.anchors),
        read_depth=part(inputs.depth),
        read_mask=mask_of if inputs.mask is not None else None,
        control_of=control_of if nets is not None else None,
        content_of=keyframes.content_of if keyframes is not None else None,
        schedule_of=keyframes.schedule_of if keyframes is not None else None,
        depth_estimator=estimator,
        mode=window.mode,
        hold=float(window.hold),
        per_level=window.get("frames_per_level"),
        **edit,
    )
